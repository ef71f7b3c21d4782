//! What a tree copy keeps beyond bytes, mode and mtime: owners (by name, or by number), hard-link
//! groups, extended attributes (POSIX ACLs are `system.posix_acl_*` attributes), holes of sparse
//! files, and device and special nodes. Reading them for a listing ([`Root::walk_meta`]) and
//! applying them to an entry beneath a root ([`Root::set_meta`]) never follows a final symlink.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;

use rustix::fs::{self as rfs, AtFlags, Mode, OFlags, SeekFrom};
use rustix::io::Errno;
use xfer_proto::{ByteRange, EntryKind, Meta, MetaEntry, SetMeta, Xattr, MAX_HOLES};

use crate::tree::{Unreadable, Walked};
use crate::{acl, on_disk, partial_name, CoreError, RangeSet, Result, Root};

/// Largest attribute value read or written (the kernel's own limit).
const MAX_XATTR_VALUE: usize = 64 * 1024;

/// True for the attribute namespaces a tree copy carries: `user`, `trusted`, `security` and the
/// two ACLs. Other `system.*` names are the filesystem's own business.
pub fn xattr_copied(name: &str) -> bool {
    name.starts_with("user.")
        || name.starts_with("trusted.")
        || name.starts_with("security.")
        || name == "system.posix_acl_access"
        || name == "system.posix_acl_default"
}

/// `listxattrat(2)` (Linux 6.13): the same number on every architecture, as every system call
/// added since 5.1; the `libc` crate does not name it on x86-64 yet.
const SYS_LISTXATTRAT: libc::c_long = 465;

/// Set once `listxattrat` turned out not to be available: no need to ask it again.
static NO_LISTXATTRAT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether `leaf` in `dir` has an attribute [`xattr_copied`] selects, asked by name without
/// following a final symlink and without opening it (`listxattrat`): most files of a tree have
/// none, and a walk that opened each one to ask spent an open, a `stat` and a close per file on
/// the critical path of a tree copy's start. `None` where the kernel cannot say so this way
/// (before 6.13, a name too long, another error): the caller opens the file and asks it.
pub fn has_copied_xattrs_at(dir: BorrowedFd<'_>, leaf: &str) -> Option<bool> {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::Ordering;
    if NO_LISTXATTRAT.load(Ordering::Relaxed) {
        return None;
    }
    // The name NUL-terminated on the stack: no allocation per file.
    let mut name = [0u8; 256];
    let leaf = on_disk(leaf);
    let leaf = std::os::unix::ffi::OsStrExt::as_bytes(&*leaf);
    if leaf.len() >= name.len() || leaf.contains(&0) {
        return None;
    }
    name[..leaf.len()].copy_from_slice(leaf);
    // Room for the names of a few attributes; a file with more (ERANGE) has some to copy as
    // likely as not, and is asked through a descriptor.
    let mut list = [0u8; 1024];
    // SAFETY: `name` is NUL-terminated and outlives the call; `list` is writable for its length;
    // the kernel writes at most `list.len()` bytes into it.
    let n = unsafe {
        libc::syscall(
            SYS_LISTXATTRAT,
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            list.as_mut_ptr(),
            list.len(),
        )
    };
    if n < 0 {
        return match Errno::from_raw_os_error(std::io::Error::last_os_error().raw_os_error()?) {
            // Not in this kernel, or refused by a seccomp filter that does not know it (the
            // call itself never answers EPERM).
            Errno::NOSYS | Errno::PERM => {
                NO_LISTXATTRAT.store(true, Ordering::Relaxed);
                None
            }
            Errno::OPNOTSUPP => Some(false),
            _ => None,
        };
    }
    let names = list.get(..usize::try_from(n).ok()?)?;
    Some(
        names
            .split(|b| *b == 0)
            .filter_map(|raw| std::str::from_utf8(raw).ok())
            .any(xattr_copied),
    )
}

/// The attributes of the open file `file` that [`xattr_copied`] selects, sorted by name.
/// A filesystem without attributes has none.
///
/// # Errors
/// I/O errors other than "not supported".
pub fn read_xattrs(file: BorrowedFd<'_>) -> std::io::Result<Vec<Xattr>> {
    let size = match rfs::flistxattr_query(file) {
        Ok(n) => n,
        Err(Errno::OPNOTSUPP) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    if size == 0 {
        return Ok(Vec::new());
    }
    // The list may grow between the two calls: ask again with room to spare.
    let mut names = vec![0u8; size + 256];
    let n = rfs::flistxattr(file, &mut names[..])?;
    names.truncate(n);
    let mut out = Vec::new();
    let mut value = vec![0u8; MAX_XATTR_VALUE];
    for raw in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let Ok(name) = std::str::from_utf8(raw) else {
            continue;
        };
        if !xattr_copied(name) {
            continue;
        }
        match rfs::fgetxattr(file, name, &mut value[..]) {
            Ok(len) => out.push(Xattr {
                name: name.to_string(),
                value: value[..len].to_vec(),
            }),
            // Removed meanwhile.
            Err(Errno::NODATA) => {}
            Err(e) => return Err(e.into()),
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Gives the open file `file` exactly the attributes `want` (of the namespaces a tree copy
/// carries): missing ones are set, others removed. ACLs that carry names get the local ids of
/// those names, unless `numeric_ids` ([`acl::to_local`]).
///
/// # Errors
/// The first refusal (`EOPNOTSUPP` where the filesystem has no attributes, `EPERM` for a
/// namespace this process may not write).
pub fn write_xattrs(
    file: BorrowedFd<'_>,
    want: &[Xattr],
    numeric_ids: bool,
) -> std::io::Result<()> {
    write_xattrs_over(file, &read_xattrs(file)?, want, numeric_ids)
}

/// [`write_xattrs`] for a file whose attributes are known to be `have` ([`read_xattrs`]'s).
///
/// # Errors
/// As [`write_xattrs`].
pub fn write_xattrs_over(
    file: BorrowedFd<'_>,
    have: &[Xattr],
    want: &[Xattr],
    numeric_ids: bool,
) -> std::io::Result<()> {
    for old in have {
        if !want.iter().any(|x| x.name == old.name) {
            rfs::fremovexattr(file, old.name.as_str())?;
        }
    }
    let mut names = Names::default();
    for x in want {
        if !xattr_copied(&x.name) {
            continue;
        }
        let value = match acl::is_acl(&x.name) {
            true => acl::to_local(&x.value, numeric_ids, &mut names),
            false => x.value.clone(),
        };
        if have.iter().any(|h| h.name == x.name && h.value == value) {
            continue;
        }
        rfs::fsetxattr(file, x.name.as_str(), &value, rfs::XattrFlags::empty())?;
    }
    Ok(())
}

/// Drops the names of the ACLs among `xattrs`: what a peer without `CAP_TREE_META_V2` gets.
pub fn xattrs_without_names(xattrs: &mut [Xattr]) {
    for x in xattrs.iter_mut().filter(|x| acl::is_acl(&x.name)) {
        x.value = acl::without_names(&x.value);
    }
}

/// True when two entries' attributes are the same, their ACLs compared by name where both
/// carry one and `by_name` ([`acl::same`]).
pub fn xattrs_same(a: &[Xattr], b: &[Xattr], by_name: bool) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.name == y.name
                && match acl::is_acl(&x.name) {
                    true => acl::same(&x.value, &y.value, by_name),
                    false => x.value == y.value,
                }
        })
}

/// The holes of the open file `file` of `size` bytes, as `SEEK_HOLE`/`SEEK_DATA` find them
/// (the implicit hole at the end of a file is not one). At most [`MAX_HOLES`]: beyond that the
/// largest are kept, so what is left out only travels as zeros.
///
/// # Errors
/// I/O errors other than the filesystem not knowing holes (then there are none).
pub fn holes_of(file: BorrowedFd<'_>, size: u64) -> std::io::Result<Vec<ByteRange>> {
    let mut holes = Vec::new();
    let mut pos = 0;
    while pos < size {
        let hole = match rfs::seek(file, SeekFrom::Hole(pos)) {
            Ok(h) => h.min(size),
            Err(Errno::NXIO) => break,
            Err(Errno::INVAL | Errno::OPNOTSUPP) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        if hole >= size {
            break;
        }
        let data = match rfs::seek(file, SeekFrom::Data(hole)) {
            Ok(d) => d.min(size),
            // No data after the hole: it runs to the end.
            Err(Errno::NXIO) => size,
            Err(e) => return Err(e.into()),
        };
        if data > hole {
            holes.push(ByteRange::new(hole, data));
        }
        pos = data;
    }
    if holes.len() > MAX_HOLES {
        holes.sort_by_key(|h| std::cmp::Reverse(h.len()));
        holes.truncate(MAX_HOLES);
        holes.sort();
    }
    Ok(holes)
}

/// Splits `missing` into chunks of at most `chunk_size` bytes that never straddle a hole's
/// edge, so each is either all data or all hole.
pub fn split_at_holes(missing: &[ByteRange], holes: &RangeSet, chunk_size: u32) -> Vec<ByteRange> {
    let mut pieces = Vec::new();
    for r in missing {
        let mut start = r.start;
        while start < r.end {
            // The next edge: the end of the hole `start` is in, or the start of the next one.
            let edge = match holes.range_at(start) {
                Some(h) => h.end,
                None => holes
                    .iter()
                    .find(|h| h.start > start)
                    .map_or(r.end, |h| h.start),
            };
            let end = edge.min(r.end);
            pieces.push(ByteRange::new(start, end));
            start = end;
        }
    }
    crate::split_into_chunks(&pieces, chunk_size)
}

/// Makes `range` of `file` read as zeros without writing it: the blocks are given back
/// (`FALLOC_FL_PUNCH_HOLE`), or zeros written where the filesystem cannot punch holes.
///
/// # Errors
/// I/O errors.
pub fn punch_hole(file: &File, range: ByteRange) -> std::io::Result<()> {
    if range.is_empty() {
        return Ok(());
    }
    let flags = rfs::FallocateFlags::PUNCH_HOLE | rfs::FallocateFlags::KEEP_SIZE;
    match rfs::fallocate(file, flags, range.start, range.len()) {
        Ok(()) => Ok(()),
        Err(Errno::OPNOTSUPP) => {
            let zeros = vec![0u8; 1 << 16];
            let mut pos = range.start;
            while pos < range.end {
                let n = zeros.len().min((range.end - pos) as usize);
                file.write_all_at(&zeros[..n], pos)?;
                pos += n as u64;
            }
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// CRC32 of `len` zero bytes (a hole's journal record), in `O(log len)`: the CRC of a run is
/// built from the CRCs of runs half as long.
pub fn crc32_of_zeros(len: u64) -> u32 {
    let mut total = crc32fast::Hasher::new();
    let mut run = crc32fast::Hasher::new();
    run.update(&[0]);
    let mut left = len;
    while left > 0 {
        if left & 1 == 1 {
            total.combine(&run);
        }
        let copy = run.clone();
        run.combine(&copy);
        left >>= 1;
    }
    total.finalize()
}

/// What owners and ACL entries are mapped through: this system's user and group names (a
/// test gives a table of its own).
pub trait NameTable {
    /// The name of user `uid`, empty if it has none.
    fn user_name(&mut self, uid: u32) -> String;
    /// The name of group `gid`, empty if it has none.
    fn group_name(&mut self, gid: u32) -> String;
    /// The id of the user called `name`, if there is one.
    fn user_id(&mut self, name: &str) -> Option<u32>;
    /// The id of the group called `name`, if there is one.
    fn group_id(&mut self, name: &str) -> Option<u32>;
}

impl NameTable for Names {
    fn user_name(&mut self, uid: u32) -> String {
        self.user(uid)
    }
    fn group_name(&mut self, gid: u32) -> String {
        self.group(gid)
    }
    fn user_id(&mut self, name: &str) -> Option<u32> {
        uzers::get_user_by_name(name).map(|u| u.uid())
    }
    fn group_id(&mut self, name: &str) -> Option<u32> {
        uzers::get_group_by_name(name).map(|g| g.gid())
    }
}

/// User and group names by id, looked up once each.
#[derive(Debug, Default)]
pub struct Names {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl Names {
    /// The user name of `uid`, empty if it has none.
    pub fn user(&mut self, uid: u32) -> String {
        self.users
            .entry(uid)
            .or_insert_with(|| {
                uzers::get_user_by_uid(uid)
                    .and_then(|u| u.name().to_str().map(str::to_string))
                    .unwrap_or_default()
            })
            .clone()
    }

    /// The group name of `gid`, empty if it has none.
    pub fn group(&mut self, gid: u32) -> String {
        self.groups
            .entry(gid)
            .or_insert_with(|| {
                uzers::get_group_by_gid(gid)
                    .and_then(|g| g.name().to_str().map(str::to_string))
                    .unwrap_or_default()
            })
            .clone()
    }
}

/// The ids to give an entry, as rsync picks them: the local id of the sender's name, or the
/// sender's number when there is no name, the name is unknown here, or `numeric_ids` is set.
/// Root (id 0) stays root whatever it is called.
pub fn local_ids(req: &SetMeta) -> (u32, u32) {
    if req.numeric_ids {
        return (req.uid, req.gid);
    }
    let mut names = Names::default();
    (
        local_id(req.uid, &req.user, |n| names.user_id(n)),
        local_id(req.gid, &req.group, |n| names.group_id(n)),
    )
}

/// The local id for the sender's `id` called `name` (owners and ACL entries alike): the id
/// `lookup` gives the name, else `id`; 0 stays 0.
pub fn local_id(id: u32, name: &str, lookup: impl FnOnce(&str) -> Option<u32>) -> u32 {
    match id {
        0 => 0,
        _ if name.is_empty() => id,
        _ => lookup(name).unwrap_or(id),
    }
}

/// Hard-link groups of a walk, by inode. Only files with more than one name are tracked, and
/// each is forgotten once all its names were seen: the map holds at most one entry (24 bytes
/// and the map's overhead) per multiply-linked inode whose other names are still to come, or
/// lie outside the tree.
#[derive(Debug, Default)]
pub struct LinkGroups {
    open: HashMap<(u64, u64), (u64, u64)>,
    next: u64,
}

impl LinkGroups {
    /// The group of a file with `nlink` names at (`dev`, `ino`); 0 for a single name.
    pub fn group_of(&mut self, dev: u64, ino: u64, nlink: u64) -> u64 {
        if nlink < 2 {
            return 0;
        }
        let key = (dev, ino);
        if let Some((group, left)) = self.open.get_mut(&key) {
            let group = *group;
            *left -= 1;
            if *left == 0 {
                self.open.remove(&key);
            }
            return group;
        }
        self.next += 1;
        self.open.insert(key, (self.next, nlink - 1));
        self.next
    }

    /// Inodes tracked now.
    pub fn tracked(&self) -> usize {
        self.open.len()
    }
}

/// What [`Root::set_meta`] could not keep; the entry is otherwise done.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MetaOutcome {
    /// The owner or group could not be set (no privilege).
    pub not_chowned: bool,
    /// The filesystem refused the attributes: why.
    pub xattrs_refused: Option<String>,
}

/// An entry's owner, group and permission bits (`st_mode & 0o7777`): what [`apply_meta`]
/// compares with what is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ownership {
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Permission bits, set-id and sticky bits included.
    pub mode: u32,
}

impl Ownership {
    /// The ownership `st` reports.
    pub fn of(st: &rfs::Stat) -> Self {
        Self {
            uid: st.st_uid,
            gid: st.st_gid,
            mode: st.st_mode & 0o7777,
        }
    }
}

/// Gives the regular file or directory open as `file`, as `now` found it (owner, group and
/// mode; its attributes too where `have` knows them, else they are read), what `req` asks for
/// but its name: owner and group (if this process may), attributes (when `req.xattrs` is set),
/// then mode and mtime (a change of owner clears set-id bits). The mode is left alone when it
/// is already right and nothing done here could have changed it: no change of owner, no
/// attribute set (an ACL rewrites the group bits).
///
/// # Errors
/// I/O errors but those reported in the outcome.
pub fn apply_meta(
    file: &File,
    now: Ownership,
    have: Option<&[Xattr]>,
    req: &SetMeta,
) -> Result<MetaOutcome> {
    let ctx = |what: &str| format!("{what} {:?}", req.name);
    let mut outcome = MetaOutcome::default();
    let wanted = local_ids(req);
    let chowned = (now.uid, now.gid) != wanted;
    if chowned {
        let chown = |u, g| rfs::fchown(file, u, g);
        outcome.not_chowned =
            change_owner(chown, wanted).map_err(|e| CoreError::io(ctx("chown"), e.into()))?;
    }
    let mut attributes_set = false;
    if let Some(want) = &req.xattrs {
        attributes_set = !want.is_empty();
        let written = match have {
            Some(have) => write_xattrs_over(file.as_fd(), have, want, req.numeric_ids),
            None => write_xattrs(file.as_fd(), want, req.numeric_ids),
        };
        if let Err(e) = written {
            outcome.xattrs_refused = Some(e.to_string());
        }
    }
    let mode = req.mode & 0o7777;
    if chowned || attributes_set || now.mode != mode {
        rfs::fchmod(file, Mode::from_raw_mode(mode))
            .map_err(|e| CoreError::io(ctx("chmod"), e.into()))?;
    }
    rfs::futimens(file, &timestamps(req.mtime_ns))
        .map_err(|e| CoreError::io(ctx("setting mtime of"), e.into()))?;
    Ok(outcome)
}

/// Changes owner and group to `(uid, gid)` through `chown`; true when this process lacks the
/// privilege to give the owner (the group is still set if it may be).
fn change_owner(
    chown: impl Fn(Option<rfs::Uid>, Option<rfs::Gid>) -> rustix::io::Result<()>,
    (uid, gid): (u32, u32),
) -> rustix::io::Result<bool> {
    let (u, g) = (Some(rfs::Uid::from_raw(uid)), Some(rfs::Gid::from_raw(gid)));
    match chown(u, g) {
        Ok(()) => Ok(false),
        Err(Errno::PERM) => {
            // Unprivileged: the group may still be one of ours.
            let _ = chown(None, g);
            Ok(true)
        }
        Err(e) => Err(e),
    }
}

fn timestamps(mtime_ns: i64) -> rfs::Timestamps {
    let mtime = rfs::Timespec {
        tv_sec: mtime_ns.div_euclid(1_000_000_000),
        tv_nsec: mtime_ns.rem_euclid(1_000_000_000) as _,
    };
    rfs::Timestamps {
        // The access time is not kept: "now" is what reading a copy would give it anyway.
        last_access: rfs::Timespec {
            tv_sec: 0,
            tv_nsec: rfs::UTIME_OMIT as _,
        },
        last_modification: mtime,
    }
}

impl Root {
    /// [`Root::walk`] with each entry's [`Meta`]: owner and group (with names), hard-link
    /// group, device number and file type of special files, allocated size and holes of
    /// files, and with `xattrs` their extended attributes. An entry that vanished meanwhile
    /// keeps an empty `Meta` (`st_mode` 0, which no entry has).
    ///
    /// # Errors
    /// As [`Root::walk`].
    pub fn walk_meta(&self, dir: &str, digests: bool, xattrs: bool) -> Result<Vec<MetaEntry>> {
        self.walk_meta_leaving(dir, digests, xattrs, None)
    }

    /// [`Root::walk_meta`] that leaves out what this process cannot read, as
    /// [`Root::walk_readable`] does.
    ///
    /// # Errors
    /// As [`Root::walk`], for any other failure.
    pub fn walk_meta_readable(
        &self,
        dir: &str,
        digests: bool,
        xattrs: bool,
    ) -> Result<Walked<MetaEntry>> {
        let mut unreadable = Vec::new();
        let entries = self.walk_meta_leaving(dir, digests, xattrs, Some(&mut unreadable))?;
        Ok(Walked {
            entries,
            unreadable,
        })
    }

    fn walk_meta_leaving(
        &self,
        dir: &str,
        digests: bool,
        xattrs: bool,
        unreadable: Option<&mut Vec<Unreadable>>,
    ) -> Result<Vec<MetaEntry>> {
        let mut names = Names::default();
        // Each entry's metadata comes from the walk's own `stat` of it (one lookup per name,
        // on the critical path at a tree copy's start), and with the walk's directory handle.
        let walked =
            self.walk_visiting(dir, digests, unreadable, &mut |dir, leaf, st, entry| {
                entry_meta(dir, leaf, st, entry, xattrs, &mut names).unwrap_or_default()
            })?;
        // Hard-link groups are numbered in path order, as the entries are listed.
        let mut groups = LinkGroups::default();
        Ok(walked
            .into_iter()
            .map(|(entry, (mut meta, inode))| {
                if let Some((dev, ino, nlink)) = inode {
                    meta.link_group = groups.group_of(dev, ino, nlink);
                }
                MetaEntry { entry, meta }
            })
            .collect())
    }

    /// Gives the entry `req.name` its owner and group (if this process may), its attributes
    /// (when `req.xattrs` is set), its mode and mtime, in that order, never following a final
    /// symlink. What could not be kept is reported, not an error.
    ///
    /// # Errors
    /// `BadPath`, `NotFound` or I/O errors.
    pub fn set_meta(&self, req: &SetMeta) -> Result<MetaOutcome> {
        // An empty name is the root itself (the top of a tree received into it).
        let (slot_dir, slot_leaf) = if req.name.is_empty() {
            let top = self
                .open_dir("")
                .map_err(|e| crate::root::map_open_err("", e))?;
            (std::sync::Arc::new(top), ".".to_string())
        } else {
            let slot = self.parent_slot_no_symlinks(&req.name, false)?;
            (slot.dir, slot.leaf)
        };
        let (dir, leaf) = (slot_dir.as_fd(), slot_leaf.as_str());
        let ctx = |what: &str| format!("{what} {:?}", req.name);
        let st =
            rfs::statat(dir, on_disk(leaf), AtFlags::SYMLINK_NOFOLLOW).map_err(|e| match e {
                Errno::NOENT => CoreError::NotFound(req.name.clone()),
                e => CoreError::io(ctx("stat"), e.into()),
            })?;
        let kind = rfs::FileType::from_raw_mode(st.st_mode);
        let mut outcome = MetaOutcome::default();
        let (uid, gid) = local_ids(req);
        // Files and directories are changed through a descriptor, so nothing put in their place
        // meanwhile is touched; links and special nodes (opening a device may do anything) by
        // name, without following.
        let opened = match kind {
            rfs::FileType::RegularFile | rfs::FileType::Directory => {
                let dir_flag = if kind == rfs::FileType::Directory {
                    OFlags::DIRECTORY
                } else {
                    OFlags::empty()
                };
                rfs::openat(
                    dir,
                    on_disk(leaf),
                    OFlags::RDONLY
                        | OFlags::NOFOLLOW
                        | OFlags::NONBLOCK
                        | OFlags::NOCTTY
                        | OFlags::CLOEXEC
                        | dir_flag,
                    Mode::empty(),
                )
                .ok()
                .map(File::from)
            }
            _ => None,
        };
        if let Some(file) = &opened {
            let now = rfs::fstat(file).map_err(|e| CoreError::io(ctx("stat"), e.into()))?;
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) {
                return Err(CoreError::Changed(req.name.clone()));
            }
            return apply_meta(file, Ownership::of(&now), None, req);
        }
        if (st.st_uid, st.st_gid) != (uid, gid) {
            let chown = |u, g| rfs::chownat(dir, on_disk(leaf), u, g, AtFlags::SYMLINK_NOFOLLOW);
            outcome.not_chowned = change_owner(chown, (uid, gid))
                .map_err(|e| CoreError::io(ctx("chown"), e.into()))?;
        }
        if kind != rfs::FileType::Symlink {
            let mode = Mode::from_raw_mode(req.mode & 0o7777);
            rfs::chmodat(dir, on_disk(leaf), mode, AtFlags::empty())
                .map_err(|e| CoreError::io(ctx("chmod"), e.into()))?;
        }
        let times = timestamps(req.mtime_ns);
        rfs::utimensat(dir, on_disk(leaf), &times, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| CoreError::io(ctx("setting mtime of"), e.into()))?;
        Ok(outcome)
    }

    /// Makes `name` another name of the regular file `existing` (both resolved without
    /// symlinks); a regular file already at `name` is replaced atomically.
    ///
    /// # Errors
    /// `BadPath`, `NotFound`, `NotRegular` (`existing` is no regular file, or a directory,
    /// link or special file has the name) or I/O errors.
    pub fn make_hard_link(&self, name: &str, existing: &str) -> Result<()> {
        let from = self.parent_slot_no_symlinks(existing, false)?;
        let st = rfs::statat(&*from.dir, on_disk(&from.leaf), AtFlags::SYMLINK_NOFOLLOW).map_err(
            |e| match e {
                Errno::NOENT => CoreError::NotFound(existing.to_string()),
                e => CoreError::io(format!("stat {existing:?}"), e.into()),
            },
        )?;
        if rfs::FileType::from_raw_mode(st.st_mode) != rfs::FileType::RegularFile {
            return Err(CoreError::NotRegular(existing.to_string()));
        }
        let to = self.parent_slot_no_symlinks(name, true)?;
        let dir = to.dir.as_fd();
        match rfs::statat(dir, on_disk(&to.leaf), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(there) if (there.st_dev, there.st_ino) == (st.st_dev, st.st_ino) => return Ok(()),
            Ok(there)
                if rfs::FileType::from_raw_mode(there.st_mode) != rfs::FileType::RegularFile =>
            {
                return Err(CoreError::NotRegular(name.to_string()))
            }
            _ => {}
        }
        let part = partial_name(&to.leaf);
        let ctx = |what: &str| format!("{what} {name:?}");
        let _ = rfs::unlinkat(dir, on_disk(&part), AtFlags::empty());
        rfs::linkat(
            &*from.dir,
            on_disk(&from.leaf),
            dir,
            on_disk(&part),
            AtFlags::empty(),
        )
        .map_err(|e| CoreError::io(ctx("linking"), e.into()))?;
        rfs::renameat(dir, on_disk(&part), dir, on_disk(&to.leaf))
            .map_err(|e| CoreError::io(ctx("renaming link"), e.into()))
    }

    /// Creates the device, FIFO or socket node `name` (`st_mode` gives its type) unless one of
    /// that type and device number is there; a regular file or another node in the way is
    /// replaced, a directory or link is not.
    ///
    /// # Errors
    /// `BadPath` (not a node type), `NotRegular`, `PermissionDenied`-like I/O errors (devices
    /// need privilege) or other I/O errors.
    pub fn make_node(&self, name: &str, st_mode: u32, rdev: u64) -> Result<()> {
        let kind = rfs::FileType::from_raw_mode(st_mode);
        if !matches!(
            kind,
            rfs::FileType::Fifo
                | rfs::FileType::Socket
                | rfs::FileType::CharacterDevice
                | rfs::FileType::BlockDevice
        ) {
            return Err(CoreError::BadPath(format!(
                "{name}: not a device or special file"
            )));
        }
        let slot = self.parent_slot_no_symlinks(name, true)?;
        let dir = slot.dir.as_fd();
        let leaf = slot.leaf.as_str();
        if let Ok(there) = rfs::statat(dir, on_disk(leaf), AtFlags::SYMLINK_NOFOLLOW) {
            let there_kind = rfs::FileType::from_raw_mode(there.st_mode);
            if there_kind == kind && there.st_rdev == rdev {
                return Ok(());
            }
            if matches!(
                there_kind,
                rfs::FileType::Directory | rfs::FileType::Symlink
            ) {
                return Err(CoreError::NotRegular(name.to_string()));
            }
        }
        let part = partial_name(leaf);
        let ctx = |what: &str| format!("{what} {name:?}");
        let _ = rfs::unlinkat(dir, on_disk(&part), AtFlags::empty());
        rfs::mknodat(
            dir,
            on_disk(&part),
            kind,
            Mode::from_raw_mode(st_mode & 0o7777),
            rdev,
        )
        .map_err(|e| match e {
            // Refused for this entry only: the copy goes on without it.
            Errno::PERM => CoreError::BadPath(format!(
                "{name}: creating a device needs privilege (CAP_MKNOD)"
            )),
            e => CoreError::io(ctx("creating node"), e.into()),
        })?;
        rfs::renameat(dir, on_disk(&part), dir, on_disk(leaf))
            .map_err(|e| CoreError::io(ctx("renaming node"), e.into()))
    }
}

/// A file's device, inode number and count of names, as its `stat` gave them.
type Inode = (u64, u64, u64);

/// The [`Meta`] of `leaf` in `dir`, listed as `entry` and stated as `st`, and a file's
/// [`Inode`], from which the caller numbers its hard-link group once the entries are in order.
fn entry_meta(
    dir: BorrowedFd<'_>,
    leaf: &str,
    st: &rfs::Stat,
    entry: &xfer_proto::TreeEntry,
    xattrs: bool,
    names: &mut Names,
) -> std::io::Result<(Meta, Option<Inode>)> {
    let mut meta = Meta {
        uid: st.st_uid,
        gid: st.st_gid,
        user: names.user(st.st_uid),
        group: names.group(st.st_gid),
        link_group: 0,
        st_mode: st.st_mode,
        rdev: st.st_rdev,
        allocated: st.st_blocks as u64 * 512,
        holes: Vec::new(),
        xattrs: Vec::new(),
    };
    // A file's inode, for its hard-link group, given once the entries are in path order.
    let inode = (entry.kind == EntryKind::File).then_some((st.st_dev, st.st_ino, st.st_nlink));
    let sparse = entry.kind == EntryKind::File && meta.allocated < entry.size;
    if !(xattrs && matches!(entry.kind, EntryKind::File | EntryKind::Dir) || sparse) {
        return Ok((meta, inode));
    }
    // Attributes only, and none to copy: nothing to open the file for.
    if !sparse && has_copied_xattrs_at(dir, leaf) == Some(false) {
        return Ok((meta, inode));
    }
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let Ok(fd) = rfs::openat(dir, on_disk(leaf), flags, Mode::empty()) else {
        return Ok((meta, inode));
    };
    let now = rfs::fstat(&fd)?;
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) {
        return Ok((meta, inode));
    }
    // What cannot be read is left out; the owner and mode above still hold.
    if sparse {
        meta.holes = holes_of(fd.as_fd(), entry.size).unwrap_or_default();
    }
    if xattrs {
        meta.xattrs = read_xattrs(fd.as_fd()).unwrap_or_default();
        // ACLs are listed with the names of their entries, which the receiver maps as owners.
        for x in meta.xattrs.iter_mut().filter(|x| acl::is_acl(&x.name)) {
            x.value = acl::with_names(&x.value, names);
        }
    }
    Ok((meta, inode))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_groups_forget_an_inode_once_all_its_names_are_seen() {
        let mut groups = LinkGroups::default();
        assert_eq!(groups.group_of(1, 10, 1), 0);
        let a = groups.group_of(1, 20, 3);
        assert_eq!(groups.tracked(), 1);
        let b = groups.group_of(1, 30, 2);
        assert_ne!(a, b);
        assert_eq!(groups.group_of(1, 20, 3), a);
        assert_eq!(groups.group_of(1, 30, 2), b);
        assert_eq!(groups.tracked(), 1, "the pair is complete");
        assert_eq!(groups.group_of(1, 20, 3), a);
        assert_eq!(groups.tracked(), 0);
    }

    #[test]
    fn ids_are_mapped_by_name_unless_numeric_or_unknown() {
        let nobody = uzers::get_user_by_name("nobody").expect("a nobody user");
        let req = |user: &str, numeric_ids| SetMeta {
            name: "x".into(),
            mode: 0,
            mtime_ns: 0,
            uid: 1234,
            gid: 0,
            user: user.into(),
            group: "no-such-group-xfer".into(),
            numeric_ids,
            xattrs: None,
        };
        assert_eq!(local_ids(&req("nobody", false)), (nobody.uid(), 0));
        assert_eq!(local_ids(&req("nobody", true)), (1234, 0));
        assert_eq!(local_ids(&req("no-such-user-xfer", false)), (1234, 0));
        assert_eq!(local_ids(&req("", false)), (1234, 0));
    }

    #[test]
    fn chunks_never_straddle_a_hole() {
        let holes = RangeSet::from_ranges([ByteRange::new(10, 30), ByteRange::new(50, 60)]);
        let chunks = split_at_holes(&[ByteRange::new(0, 70)], &holes, 16);
        let edges: Vec<_> = chunks.iter().map(|c| (c.start, c.end)).collect();
        assert_eq!(
            edges,
            vec![
                (0, 10),
                (10, 26),
                (26, 30),
                (30, 46),
                (46, 50),
                (50, 60),
                (60, 70)
            ]
        );
        assert!(chunks.iter().all(
            |c| holes.contains(*c) || !holes.iter().any(|h| h.start < c.end && c.start < h.end)
        ));
    }

    #[test]
    fn holes_are_found_and_punched() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("sparse");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(1 << 22).unwrap();
        file.write_all_at(&[1; 4096], 1 << 20).unwrap();
        let holes = holes_of(file.as_fd(), 1 << 22).unwrap();
        assert_eq!(
            holes,
            vec![
                ByteRange::new(0, 1 << 20),
                ByteRange::new((1 << 20) + 4096, 1 << 22)
            ]
        );
        punch_hole(&file, ByteRange::new(1 << 20, (1 << 20) + 4096)).unwrap();
        assert_eq!(holes_of(file.as_fd(), 1 << 22).unwrap().len(), 1);
        let mut back = [9u8; 4096];
        file.read_exact_at(&mut back, 1 << 20).unwrap();
        assert_eq!(back, [0; 4096]);
        for len in [0, 1, 4096, 65_537, 3 << 20] {
            assert_eq!(crc32_of_zeros(len), crc32fast::hash(&vec![0; len as usize]));
        }
    }

    #[test]
    fn attributes_are_asked_by_name_and_still_listed_by_the_walk() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root::open(tmp.path()).unwrap();
        std::fs::create_dir(tmp.path().join("t")).unwrap();
        std::fs::write(tmp.path().join("t/plain"), b"x").unwrap();
        std::fs::write(tmp.path().join("t/tagged"), b"x").unwrap();
        let tagged = tmp.path().join("t/tagged");
        if rfs::setxattr(&tagged, "user.origin", b"here", rfs::XattrFlags::empty()).is_err() {
            return; // a filesystem without user attributes: nothing to ask
        }
        std::os::unix::fs::symlink("tagged", tmp.path().join("t/link")).unwrap();
        let dir = File::open(tmp.path().join("t")).unwrap();
        let asked = |leaf: &str| has_copied_xattrs_at(dir.as_fd(), leaf);
        if asked("plain").is_none() && NO_LISTXATTRAT.load(std::sync::atomic::Ordering::Relaxed) {
            return; // a kernel before listxattrat (6.13): the walk opens each file, as before
        }
        assert_eq!(asked("plain"), Some(false));
        assert_eq!(asked("tagged"), Some(true));
        assert_eq!(
            asked("link"),
            Some(false),
            "the link's own, not its target's"
        );
        assert_eq!(asked("missing"), None);
        let listed = root.walk_meta("t", false, true).unwrap();
        let xattrs = |p: &str| {
            let e = listed.iter().find(|e| e.entry.path == p).unwrap();
            e.meta.xattrs.clone()
        };
        assert!(xattrs("plain").is_empty());
        assert_eq!(
            xattrs("tagged"),
            vec![Xattr {
                name: "user.origin".into(),
                value: b"here".to_vec(),
            }]
        );
    }

    #[test]
    fn metadata_is_read_and_applied_without_following_links() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root::open(tmp.path()).unwrap();
        std::fs::create_dir(tmp.path().join("t")).unwrap();
        std::fs::write(tmp.path().join("t/a"), b"x").unwrap();
        std::fs::hard_link(tmp.path().join("t/a"), tmp.path().join("t/b")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", tmp.path().join("t/l")).unwrap();
        std::os::unix::fs::symlink("t", tmp.path().join("tl")).unwrap();
        let through_link = root.walk_meta("tl", false, true).unwrap();
        assert!(
            through_link.iter().all(|e| e.meta.st_mode != 0),
            "{through_link:?}"
        );
        let listed = root.walk_meta("t", false, true).unwrap();
        let group = |p: &str| {
            listed
                .iter()
                .find(|e| e.entry.path == p)
                .unwrap()
                .meta
                .link_group
        };
        assert_ne!(group("a"), 0);
        assert_eq!(group("a"), group("b"));
        let req = |name: &str, mtime_ns| SetMeta {
            name: name.into(),
            mode: 0o600,
            mtime_ns,
            uid: rustix::process::getuid().as_raw(),
            gid: rustix::process::getgid().as_raw(),
            user: String::new(),
            group: String::new(),
            numeric_ids: true,
            xattrs: Some(Vec::new()),
        };
        let passwd_before = std::fs::symlink_metadata("/etc/passwd").unwrap();
        root.set_meta(&req("t/l", 7_000_000_123)).unwrap();
        let link = std::fs::symlink_metadata(tmp.path().join("t/l")).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((link.mtime(), link.mtime_nsec()), (7, 123));
        let passwd_after = std::fs::symlink_metadata("/etc/passwd").unwrap();
        assert_eq!(passwd_before.mtime(), passwd_after.mtime());
        root.make_hard_link("t/c", "t/a").unwrap();
        assert_eq!(
            std::fs::metadata(tmp.path().join("t/c")).unwrap().ino(),
            std::fs::metadata(tmp.path().join("t/a")).unwrap().ino()
        );
        assert!(
            root.make_hard_link("t/d", "t/l").is_err(),
            "links are not regular"
        );
    }
}
