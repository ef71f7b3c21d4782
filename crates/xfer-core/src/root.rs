//! [`Root`]: every name a peer sends is resolved beneath one directory by the kernel
//! (`openat2` with `RESOLVE_BENEATH`), never by string handling alone.

use std::borrow::Cow;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::sync::Arc;

use rustix::fs::{self as rfs, Mode, OFlags, ResolveFlags};
use xfer_proto::{ListEntry, MAX_NAME_LEN};

use crate::{is_reserved_name, CoreError, Result};

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_MAGICLINKS);

/// A directory under which names are resolved; nothing outside it can be reached through it.
#[derive(Debug, Clone)]
pub struct Root {
    dir: Arc<File>,
    /// Symlinks are followed (beneath the root) unless this is set.
    no_symlinks: bool,
}

/// A directory handle and a leaf name inside it: where a file will be created or replaced.
#[derive(Debug, Clone)]
pub struct Slot {
    /// The directory that holds (or will hold) the file.
    pub dir: Arc<File>,
    /// The file's name in that directory (one component).
    pub leaf: String,
}

/// Splits and checks a `/`-separated relative name: no empty, `.` or `..` components, no NUL,
/// not absolute, not too long, no reserved partial/journal names.
///
/// # Errors
/// [`CoreError::BadPath`] saying which rule the name breaks.
pub fn validate_name(name: &str) -> Result<Vec<&str>> {
    let bad = |why: &str| Err(CoreError::BadPath(format!("{why}: {name:?}")));
    if name.is_empty() {
        return bad("empty name");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("name too long");
    }
    if name.contains('\0') {
        return bad("name contains NUL");
    }
    if name.starts_with('/') {
        return bad("absolute name");
    }
    if !xfer_proto::names::is_canonical(name) {
        return bad("escaped bytes that spell UTF-8");
    }
    let parts: Vec<&str> = name.split('/').collect();
    for part in &parts {
        match *part {
            "" => return bad("empty path component"),
            "." | ".." => return bad("'.' or '..' component"),
            p if xfer_proto::names::unescape(p).len() > 255 => {
                return bad("path component too long")
            }
            p if is_reserved_name(p) => return bad("reserved name"),
            _ => {}
        }
    }
    Ok(parts)
}

/// The bytes on disk of the wire name (or link target) `name`: itself, unless it holds escapes
/// of bytes that are not UTF-8 (proto.md §8.5). Every system call given a name from a peer or a
/// walk takes it through here.
pub fn on_disk(name: &str) -> Cow<'_, OsStr> {
    match xfer_proto::names::unescape(name) {
        Cow::Borrowed(raw) => Cow::Borrowed(OsStr::from_bytes(raw)),
        Cow::Owned(raw) => Cow::Owned(OsString::from_vec(raw)),
    }
}

pub(crate) fn map_open_err(name: &str, e: rustix::io::Errno) -> CoreError {
    match e {
        rustix::io::Errno::NOENT => CoreError::NotFound(name.to_string()),
        rustix::io::Errno::XDEV | rustix::io::Errno::LOOP => {
            CoreError::BadPath(format!("resolves outside the root: {name:?}"))
        }
        rustix::io::Errno::NOTDIR => CoreError::BadPath(format!("not a directory: {name:?}")),
        e => CoreError::io(format!("opening {name:?}"), e.into()),
    }
}

impl Root {
    /// Opens `path` as the root.
    ///
    /// # Errors
    /// I/O errors, or a path that is not a directory.
    pub fn open(path: &Path) -> Result<Self> {
        let dir = rfs::open(
            path,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| CoreError::io(format!("opening root {}", path.display()), e.into()))?;
        Ok(Self {
            dir: Arc::new(File::from(dir)),
            no_symlinks: false,
        })
    }

    /// The same root, resolving names without following any symlink: for sessions that may
    /// only touch one subtree (a copy grant), where a link could lead elsewhere in the root.
    pub fn without_symlinks(&self) -> Self {
        Self {
            dir: Arc::clone(&self.dir),
            no_symlinks: true,
        }
    }

    pub(crate) fn open_beneath(
        &self,
        path: &str,
        flags: OFlags,
        mode: Mode,
    ) -> rustix::io::Result<OwnedFd> {
        let path = if path.is_empty() { "." } else { path };
        rfs::openat2(
            self.dir.as_fd(),
            on_disk(path),
            flags | OFlags::CLOEXEC,
            mode,
            if self.no_symlinks {
                RESOLVE | ResolveFlags::NO_SYMLINKS
            } else {
                RESOLVE
            },
        )
    }

    pub(crate) fn open_dir(&self, path: &str) -> rustix::io::Result<File> {
        self.open_beneath(path, OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty())
            .map(File::from)
    }

    /// The directory `name` beneath this root, as a root of its own.
    ///
    /// # Errors
    /// `BadPath`, `NotFound` or I/O errors.
    pub fn subroot(&self, name: &str) -> Result<Self> {
        validate_name(name)?;
        let dir = self.open_dir(name).map_err(|e| map_open_err(name, e))?;
        Ok(Self {
            dir: Arc::new(dir),
            no_symlinks: self.no_symlinks,
        })
    }

    /// Opens an existing regular file for reading.
    ///
    /// # Errors
    /// `BadPath`, `NotFound`, `NotRegular` or I/O errors.
    pub fn open_read(&self, name: &str) -> Result<File> {
        validate_name(name)?;
        // Look before opening: opening a FIFO wakes its writer, a socket fails with ENXIO and a
        // device may do anything. An O_PATH handle opens nothing.
        let path_fd = self
            .open_beneath(name, OFlags::PATH, Mode::empty())
            .map_err(|e| map_open_err(name, e))?;
        let st =
            rfs::fstat(&path_fd).map_err(|e| CoreError::io(format!("stat {name:?}"), e.into()))?;
        if rfs::FileType::from_raw_mode(st.st_mode) != rfs::FileType::RegularFile {
            return Err(CoreError::NotRegular(name.to_string()));
        }
        // O_NONBLOCK: should the name be swapped for a FIFO meanwhile, opening it must not hang;
        // the type is checked again below.
        let fd = self
            .open_beneath(
                name,
                OFlags::RDONLY | OFlags::NOCTTY | OFlags::NONBLOCK,
                Mode::empty(),
            )
            .map_err(|e| match e {
                rustix::io::Errno::NXIO => CoreError::NotRegular(name.to_string()),
                e => map_open_err(name, e),
            })?;
        let file = File::from(fd);
        let meta = file
            .metadata()
            .map_err(|e| CoreError::io(format!("stat {name:?}"), e))?;
        if !meta.is_file() {
            return Err(CoreError::NotRegular(name.to_string()));
        }
        Ok(file)
    }

    /// Resolves the directory that holds `name`, creating missing directories when `create`.
    ///
    /// # Errors
    /// `BadPath`, `NotFound` (when not creating) or I/O errors.
    pub fn slot(&self, name: &str, create: bool) -> Result<Slot> {
        let slot = self.parent_slot(name, create)?;
        let (dir, leaf) = (&slot.dir, slot.leaf.as_str());
        // Only a regular file may be replaced: never a directory, device, FIFO, socket or link.
        match rfs::statat(dir.as_fd(), on_disk(leaf), rfs::AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if rfs::FileType::from_raw_mode(st.st_mode) != rfs::FileType::RegularFile => {
                return Err(CoreError::NotRegular(name.to_string()))
            }
            Ok(_) | Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(CoreError::io(format!("stat {name:?}"), e.into())),
        }
        Ok(slot)
    }

    /// [`Root::parent_slot`], refusing any symlink on the way: the slot's directory is then
    /// exactly as deep as `name` says, which link-target checks rely on.
    ///
    /// # Errors
    /// As [`Root::parent_slot`], and `BadPath` if a directory on the way is a symlink.
    pub fn parent_slot_no_symlinks(&self, name: &str, create: bool) -> Result<Slot> {
        // Missing directories are created first; the directory used is then opened anew with
        // no symlink allowed anywhere on the way.
        let slot = self.parent_slot(name, create)?;
        let parts = validate_name(name)?;
        let parent = parts[..parts.len() - 1].join("/");
        let path = if parent.is_empty() {
            "."
        } else {
            parent.as_str()
        };
        let dir = rfs::openat2(
            self.dir.as_fd(),
            on_disk(path),
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
            RESOLVE | ResolveFlags::NO_SYMLINKS,
        )
        .map_err(|e| match e {
            rustix::io::Errno::LOOP => {
                CoreError::BadPath(format!("a directory in {name:?} is a symlink"))
            }
            e => map_open_err(name, e),
        })?;
        Ok(Slot {
            dir: Arc::new(File::from(dir)),
            leaf: slot.leaf,
        })
    }

    /// Resolves the directory that holds `name` (creating missing directories when `create`),
    /// whatever `name` itself is.
    ///
    /// # Errors
    /// `BadPath`, `NotFound` (when not creating) or I/O errors.
    pub fn parent_slot(&self, name: &str, create: bool) -> Result<Slot> {
        let parts = validate_name(name)?;
        let (leaf, dirs) = parts
            .split_last()
            .expect("validate_name returns at least one part");
        let parent = dirs.join("/");
        let dir = match self.open_dir(&parent) {
            Ok(dir) => dir,
            Err(rustix::io::Errno::NOENT) if create => self.create_dirs(dirs, name)?,
            Err(e) => return Err(map_open_err(name, e)),
        };
        Ok(Slot {
            dir: Arc::new(dir),
            leaf: (*leaf).to_string(),
        })
    }

    fn create_dirs(&self, dirs: &[&str], name: &str) -> Result<File> {
        let mut dir = self.open_dir("").map_err(|e| map_open_err(name, e))?;
        for (i, part) in dirs.iter().enumerate() {
            let sub = dirs[..=i].join("/");
            match self.open_dir(&sub) {
                Ok(d) => dir = d,
                Err(rustix::io::Errno::NOENT) => {
                    match rfs::mkdirat(&dir, on_disk(part), Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                        Err(e) => return Err(CoreError::io(format!("mkdir {sub:?}"), e.into())),
                    }
                    // Reopen through the kernel's resolver: a racing symlink cannot lead out.
                    dir = self.open_dir(&sub).map_err(|e| map_open_err(name, e))?;
                }
                Err(e) => return Err(map_open_err(name, e)),
            }
        }
        Ok(dir)
    }

    /// Lists a directory (empty `dir` = the root): regular files and directories only, partial
    /// and journal files hidden, sorted by name.
    ///
    /// # Errors
    /// `BadPath`, `NotFound` or I/O errors.
    pub fn list(&self, dir: &str) -> Result<Vec<ListEntry>> {
        let dir = dir.trim_end_matches('/');
        if !dir.is_empty() {
            validate_name(dir)?;
        }
        let fd = self.open_dir(dir).map_err(|e| map_open_err(dir, e))?;
        let mut entries = Vec::new();
        let reader = rfs::Dir::read_from(&fd).map_err(|e| CoreError::io("listing", e.into()))?;
        for entry in reader {
            let entry = entry.map_err(|e| CoreError::io("listing", e.into()))?;
            let raw = entry.file_name().to_bytes();
            let name = xfer_proto::names::escape(raw);
            if name == "." || name == ".." || is_reserved_name(&name) {
                continue;
            }
            let Ok(st) = rfs::statat(&fd, raw, rfs::AtFlags::SYMLINK_NOFOLLOW) else {
                continue;
            };
            let kind = rfs::FileType::from_raw_mode(st.st_mode);
            let is_dir = kind == rfs::FileType::Directory;
            if !is_dir && kind != rfs::FileType::RegularFile {
                continue;
            }
            entries.push(ListEntry {
                name: name.to_string(),
                size: if is_dir { 0 } else { st.st_size as u64 },
                mtime_ns: st.st_mtime * 1_000_000_000 + st.st_mtime_nsec as i64,
                is_dir,
            });
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }
}

impl From<io::Error> for CoreError {
    fn from(e: io::Error) -> Self {
        Self::io("I/O", e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_names_are_checked_as_the_bytes_they_stand_for() {
        use xfer_proto::names::escape;
        // 255 bytes that are not UTF-8 take 1,020 on the wire: still one component.
        let long = escape(&[0xE9; 255]).into_owned();
        assert!(long.len() > 255);
        assert!(validate_name(&format!("d/{long}")).is_ok());
        assert!(validate_name(&escape(&[0xE9; 256])).is_err());
        // `é` spelled as the escapes of its two bytes is not a wire form: refused.
        let spelled = escape(b"\xc3").into_owned() + &escape(b"\xa9");
        assert!(matches!(
            validate_name(&spelled),
            Err(CoreError::BadPath(_))
        ));
        assert!(validate_name("caf\u{e9}").is_ok());
    }

    #[test]
    fn names_are_validated() {
        assert_eq!(validate_name("a/b/c.bin").unwrap(), vec!["a", "b", "c.bin"]);
        for bad in [
            "",
            "/etc/passwd",
            "a/../b",
            "..",
            "./a",
            "a//b",
            "a/",
            "a\0b",
            ".x.xfer-part",
            "d/.x.xfer-state",
        ] {
            assert!(
                matches!(validate_name(bad), Err(CoreError::BadPath(_))),
                "{bad:?}"
            );
        }
        assert!(validate_name(&"a".repeat(MAX_NAME_LEN + 1)).is_err());
    }

    #[test]
    fn symlinks_out_of_the_root_are_refused_by_the_kernel() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"x").unwrap();
        let root_dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), root_dir.path().join("escape")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root_dir.path().join("pw")).unwrap();
        std::fs::create_dir(root_dir.path().join("in")).unwrap();
        std::fs::write(root_dir.path().join("in/f"), b"ok").unwrap();
        std::os::unix::fs::symlink("in/f", root_dir.path().join("inner")).unwrap();
        let root = Root::open(root_dir.path()).unwrap();
        assert!(matches!(
            root.open_read("escape/secret"),
            Err(CoreError::BadPath(_))
        ));
        assert!(matches!(root.open_read("pw"), Err(CoreError::BadPath(_))));
        assert!(matches!(
            root.slot("escape/new", true),
            Err(CoreError::BadPath(_))
        ));
        assert!(!outside.path().join("new").exists());
        assert!(
            root.open_read("inner").is_ok(),
            "a symlink inside the root is followed"
        );
        assert!(matches!(
            root.open_read("in"),
            Err(CoreError::NotRegular(_))
        ));
        assert!(matches!(
            root.open_read("nope"),
            Err(CoreError::NotFound(_))
        ));
    }

    #[test]
    fn slot_creates_directories() {
        let root_dir = tempfile::tempdir().unwrap();
        let root = Root::open(root_dir.path()).unwrap();
        let slot = root.slot("a/b/c.bin", true).unwrap();
        assert_eq!(slot.leaf, "c.bin");
        assert!(root_dir.path().join("a/b").is_dir());
        assert!(matches!(
            root.slot("x/y", false),
            Err(CoreError::NotFound(_))
        ));
    }

    #[test]
    fn listing_hides_partials() {
        let root_dir = tempfile::tempdir().unwrap();
        std::fs::write(root_dir.path().join("f"), b"abc").unwrap();
        std::fs::write(root_dir.path().join(".g.xfer-part"), b"abc").unwrap();
        std::fs::write(root_dir.path().join(".g.xfer-state"), b"abc").unwrap();
        std::fs::create_dir(root_dir.path().join("d")).unwrap();
        let root = Root::open(root_dir.path()).unwrap();
        let names: Vec<_> = root
            .list("")
            .unwrap()
            .into_iter()
            .map(|e| (e.name, e.size))
            .collect();
        assert_eq!(names, vec![("d".to_string(), 0), ("f".to_string(), 3)]);
    }
}
