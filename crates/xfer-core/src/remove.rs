//! Removing one entry beneath a [`Root`] for `--delete`: the directory that holds it is
//! resolved by the kernel with no symlink allowed on the way, and the entry is removed with
//! `unlinkat` relative to that directory, so no link, inside the tree or leading out of it, is
//! ever followed. A directory is removed only once empty: a mirror removes contents first.

use rustix::fs::{self as rfs, AtFlags};
use rustix::io::Errno;

use crate::root::map_open_err;
use crate::{on_disk, validate_name, CoreError, Result, Root};

/// What [`Root::remove_entry`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removed {
    /// A file, link or special file was unlinked.
    Entry,
    /// An empty directory was removed.
    Dir,
    /// Nothing had the name (already gone).
    Nothing,
}

impl Root {
    /// Removes `name` (never the root itself: `name` must not be empty) without following any
    /// symlink: a link is removed, not what it points at, and a link among the directories on
    /// the way is refused. A directory must be empty.
    ///
    /// # Errors
    /// `BadPath` for a bad name, a symlink on the way or a directory that is not empty; I/O
    /// errors.
    pub fn remove_entry(&self, name: &str) -> Result<Removed> {
        let parts = validate_name(name)?;
        let (leaf, parents) = parts.split_last().expect("validated names have a part");
        let parent = parents.join("/");
        let dir = match self.without_symlinks().open_dir(&parent) {
            Ok(dir) => dir,
            Err(Errno::NOENT) => return Ok(Removed::Nothing),
            Err(Errno::LOOP) => {
                return Err(CoreError::BadPath(format!(
                    "a directory in {name:?} is a symlink"
                )))
            }
            Err(e) => return Err(map_open_err(name, e)),
        };
        let ctx = |what: &str| format!("{what} {name:?}");
        let st = match rfs::statat(&dir, on_disk(leaf), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => return Ok(Removed::Nothing),
            Err(e) => return Err(CoreError::io(ctx("stat"), e.into())),
        };
        let is_dir = rfs::FileType::from_raw_mode(st.st_mode) == rfs::FileType::Directory;
        let flags = if is_dir {
            AtFlags::REMOVEDIR
        } else {
            AtFlags::empty()
        };
        match rfs::unlinkat(&dir, on_disk(leaf), flags) {
            Ok(()) if is_dir => Ok(Removed::Dir),
            Ok(()) => Ok(Removed::Entry),
            Err(Errno::NOENT) => Ok(Removed::Nothing),
            Err(Errno::NOTEMPTY | Errno::EXIST) => {
                Err(CoreError::BadPath(format!("directory not empty: {name:?}")))
            }
            Err(e) => Err(CoreError::io(ctx("removing"), e.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn removes_files_links_and_empty_directories_only() {
        let tmp = tempfile::tempdir().unwrap();
        let (top, outside) = (tmp.path().join("top"), tmp.path().join("outside"));
        std::fs::create_dir_all(top.join("d/e")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("precious"), b"keep").unwrap();
        std::fs::write(top.join("d/f"), b"x").unwrap();
        symlink(&outside, top.join("out")).unwrap();
        symlink("d", top.join("inner")).unwrap();
        let root = Root::open(&top).unwrap();

        // A link is removed as a link; what it points at stays.
        assert_eq!(root.remove_entry("out").unwrap(), Removed::Entry);
        assert!(outside.join("precious").exists());
        // Nothing is reached through a link, even one inside the tree.
        let err = root.remove_entry("inner/f").unwrap_err();
        assert!(matches!(err, CoreError::BadPath(_)), "{err}");
        assert!(top.join("d/f").exists());
        // A directory goes only once empty.
        let err = root.remove_entry("d").unwrap_err();
        assert!(err.to_string().contains("not empty"), "{err}");
        assert_eq!(root.remove_entry("d/f").unwrap(), Removed::Entry);
        assert_eq!(root.remove_entry("d/e").unwrap(), Removed::Dir);
        assert_eq!(root.remove_entry("d").unwrap(), Removed::Dir);
        assert_eq!(root.remove_entry("d").unwrap(), Removed::Nothing);
        // Never the root, never a way out.
        assert!(root.remove_entry("").is_err());
        assert!(root.remove_entry("../outside/precious").is_err());
        assert!(outside.join("precious").exists());
    }
}
