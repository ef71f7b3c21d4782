//! Directory trees beneath a [`Root`]: walking one (symlinks reported, never followed), and the
//! small operations a tree copy is made of — a whole small file, a directory, a link, a flush.
//! The daemon runs them for `send -r`, the client for `recv -r`: both ends use this one module.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::time::{Duration, SystemTime};

use rustix::fs::{self as rfs, AtFlags, Mode, OFlags};
use xfer_proto::{EntryKind, FileIdentity, TreeEntry};

use crate::root::map_open_err;
use crate::{digest, is_reserved_name, partial_name, validate_name, CoreError, Result, Root};

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
        let dir = dir.trim_end_matches('/');
        if !dir.is_empty() {
            validate_name(dir)?;
        }
        let top = self.open_dir(dir).map_err(|e| map_open_err(dir, e))?;
        let st = rfs::fstat(&top).map_err(|e| CoreError::io(format!("stat {dir:?}"), e.into()))?;
        let mut out = vec![TreeEntry {
            path: String::new(),
            kind: EntryKind::Dir,
            size: 0,
            mtime_ns: mtime_ns(&st),
            mode: st.st_mode & 0o7777,
            target: String::new(),
            digest: Vec::new(),
        }];
        let mut stack = vec![(top, String::new(), 0usize)];
        while let Some((fd, rel, depth)) = stack.pop() {
            let ctx = |e: rustix::io::Errno| CoreError::io(format!("listing {rel:?}"), e.into());
            let mut names: Vec<String> = Vec::new();
            for entry in rfs::Dir::read_from(&fd).map_err(ctx)? {
                let entry = entry.map_err(ctx)?;
                let Ok(name) = entry.file_name().to_str() else {
                    continue;
                };
                if name != "." && name != ".." && !is_reserved_name(name) {
                    names.push(name.to_string());
                }
            }
            names.sort();
            for name in names {
                let Ok(st) = rfs::statat(&fd, name.as_str(), AtFlags::SYMLINK_NOFOLLOW) else {
                    continue;
                };
                let path = join(&rel, &name);
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
                            let file = File::from(
                                rfs::openat(
                                    &fd,
                                    name.as_str(),
                                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                                    Mode::empty(),
                                )
                                .map_err(|e| {
                                    CoreError::io(format!("opening {path:?}"), e.into())
                                })?,
                            );
                            entry.digest = digest::digest_file(&file, entry.size)
                                .map_err(|e| CoreError::io(format!("reading {path:?}"), e))?
                                .to_vec();
                        }
                    }
                    rfs::FileType::Directory if depth < MAX_DEPTH => {
                        entry.kind = EntryKind::Dir;
                        let sub = rfs::openat(
                            &fd,
                            name.as_str(),
                            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                            Mode::empty(),
                        )
                        .map_err(|e| CoreError::io(format!("opening {path:?}"), e.into()))?;
                        stack.push((File::from(sub), path.clone(), depth + 1));
                    }
                    rfs::FileType::Symlink => {
                        entry.kind = EntryKind::Symlink;
                        let target =
                            rfs::readlinkat(&fd, name.as_str(), Vec::new()).map_err(|e| {
                                CoreError::io(format!("reading link {path:?}"), e.into())
                            })?;
                        let Ok(target) = target.into_string() else {
                            continue;
                        };
                        entry.target = target;
                    }
                    rfs::FileType::Directory => {
                        tracing::warn!(path = %path, "directory nested too deep; left out");
                        continue;
                    }
                    _ => entry.kind = EntryKind::Special,
                }
                out.push(entry);
            }
        }
        // Parents before children, in a stable order.
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// Stores a whole small file: written to its partial name, given its mode and mtime, and
    /// renamed over `name`. Not flushed: [`Root::sync`] does that once for a whole tree.
    ///
    /// # Errors
    /// `BadPath`, `NotRegular` (a directory or link is in the way), `NoSpace` or I/O errors.
    pub fn put_file(&self, name: &str, mtime_ns: i64, mode: u32, data: &[u8]) -> Result<()> {
        let slot = self.slot(name, true)?;
        let dir = slot.dir.as_fd();
        let part = partial_name(&slot.leaf);
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let ctx = |what: &str| format!("{what} {name:?}");
        let file = File::from(
            rfs::openat(dir, part.as_str(), flags, Mode::from_raw_mode(0o600))
                .map_err(|e| CoreError::io(ctx("creating"), e.into()))?,
        );
        file.write_all_at(data, 0)
            .and_then(|()| file.set_permissions(std::fs::Permissions::from_mode(mode & 0o777)))
            .and_then(|()| file.set_modified(system_time(mtime_ns)))
            .map_err(|e| CoreError::io(ctx("writing"), e))?;
        rfs::renameat(dir, part.as_str(), dir, slot.leaf.as_str())
            .map_err(|e| CoreError::io(ctx("renaming"), e.into()))?;
        Ok(())
    }

    /// Creates directory `name` (and missing parents) if needed and sets its mode and mtime.
    ///
    /// # Errors
    /// `BadPath`, `NotRegular` (something else has the name) or I/O errors.
    pub fn make_dir(&self, name: &str, mode: u32, mtime_ns: i64) -> Result<()> {
        let slot = self.parent_slot(name, true)?;
        let ctx = |what: &str| format!("{what} {name:?}");
        match rfs::mkdirat(
            slot.dir.as_fd(),
            slot.leaf.as_str(),
            Mode::from_raw_mode(0o700),
        ) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(CoreError::io(ctx("mkdir"), e.into())),
        }
        let fd = rfs::openat(
            slot.dir.as_fd(),
            slot.leaf.as_str(),
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP => {
                CoreError::NotRegular(name.to_string())
            }
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
        let slot = self.parent_slot_no_symlinks(name, true)?;
        let dir = slot.dir.as_fd();
        if let Ok(st) = rfs::statat(dir, slot.leaf.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
            if rfs::FileType::from_raw_mode(st.st_mode) == rfs::FileType::Directory {
                return Err(CoreError::NotRegular(name.to_string()));
            }
        }
        let part = partial_name(&slot.leaf);
        let _ = rfs::unlinkat(dir, part.as_str(), AtFlags::empty());
        let ctx = |what: &str| format!("{what} {name:?}");
        rfs::symlinkat(target, dir, part.as_str())
            .map_err(|e| CoreError::io(ctx("creating link"), e.into()))?;
        rfs::renameat(dir, part.as_str(), dir, slot.leaf.as_str())
            .map_err(|e| CoreError::io(ctx("renaming link"), e.into()))
    }

    /// Reads a whole small file: its identity, mode and bytes.
    ///
    /// # Errors
    /// `NotFound`, `BadPath`, `NotRegular`, `TooLarge` (above `max`), `Changed` or I/O errors.
    pub fn read_small(&self, name: &str, max: u64) -> Result<(FileIdentity, u32, Vec<u8>)> {
        let file = self.open_read(name)?;
        let meta = file
            .metadata()
            .map_err(|e| CoreError::io(format!("stat {name:?}"), e))?;
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
        let mut data = Vec::with_capacity(meta.len() as usize);
        (&file)
            .take(max + 1)
            .read_to_end(&mut data)
            .map_err(|e| CoreError::io(format!("reading {name:?}"), e))?;
        if data.len() as u64 != identity.size {
            return Err(CoreError::Changed(name.to_string()));
        }
        Ok((identity, meta.permissions().mode() & 0o7777, data))
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
        root.put_file("t/sub/f.txt", 3_000_000_000, 0o640, b"hello")
            .unwrap();
        root.make_link("t/sub/l", "f.txt").unwrap();
        root.make_link("t/sub/l", "../empty").unwrap(); // replaced atomically
        assert!(root.make_link("t/bad", "../../x").is_err());
        assert!(matches!(
            root.make_dir("t/sub/f.txt", 0o755, 0),
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
}
