//! Filling an empty named volume from the image content it is grafted over, as
//! docker does: data, owners, modes, xattrs and times are kept.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd};

use rustix::fs::OFlags;

use crate::sys::{self, fs::TimeSpec, xattr::Target};
use crate::union::copy_up::{CopyData, make_dir_copy};
use crate::union::{Attr, Ino, Result, Time, Union};

impl Union {
    /// Fills an empty volume from the merged directory `src` it is grafted over; the
    /// volume's root takes that directory's owner and mode, as with docker.
    pub(super) fn populate_root(&self, src: Ino, root: BorrowedFd<'_>) -> Result<()> {
        self.populate_dir(src, root)?;
        let attr = self.getattr(src)?;
        sys::fs::fchown(root, Some(attr.uid), Some(attr.gid))?;
        Ok(sys::fs::chmod_fd(root, attr.mode & 0o7777)?)
    }

    /// The bytes the content of the merged directory `src` would use in a volume,
    /// counted as the volume's quota counts them (quota.rs: apparent sizes of regular
    /// files and symlinks, a hard-linked file once), so that a fill is charged like
    /// the writes that would copy it.
    pub(super) fn fill_usage(&self, src: Ino) -> Result<u64> {
        let mut seen = std::collections::HashSet::new();
        self.dir_usage(src, &mut seen)
    }

    fn dir_usage(&self, src: Ino, seen: &mut std::collections::HashSet<Ino>) -> Result<u64> {
        let fh = self.opendir(src)?;
        let listing = self.readdir(fh, 0);
        self.releasedir(fh);
        let mut total = 0u64;
        for e in listing?.iter().filter(|e| e.name != "." && e.name != "..") {
            let attr = self.lookup(src, &e.name)?.attr;
            let used = match attr.kind() {
                libc::S_IFDIR => self.dir_usage(attr.ino, seen),
                libc::S_IFREG | libc::S_IFLNK if attr.nlink <= 1 || seen.insert(attr.ino) => {
                    Ok(attr.size)
                }
                _ => Ok(0),
            };
            self.forget(attr.ino, 1);
            total = total.saturating_add(used?);
        }
        Ok(total)
    }

    /// Copies the merged directory `src` into the (empty) volume directory `dst`:
    /// data, owners, modes, xattrs and times.
    fn populate_dir(&self, src: Ino, dst: BorrowedFd<'_>) -> Result<()> {
        let fh = self.opendir(src)?;
        let listing = self.readdir(fh, 0);
        self.releasedir(fh);
        for e in listing?.iter().filter(|e| e.name != "." && e.name != "..") {
            let entry = self.lookup(src, &e.name)?;
            let copied = self.populate_entry(&entry.attr, &e.name, dst);
            self.forget(entry.attr.ino, 1);
            copied?;
        }
        Ok(())
    }

    fn populate_entry(&self, attr: &Attr, name: &OsStr, dst: BorrowedFd<'_>) -> Result<()> {
        let perm = attr.mode & 0o7777;
        match attr.kind() {
            libc::S_IFDIR => {
                let sub = make_dir_copy(dst, name)?;
                self.populate_dir(attr.ino, sub.as_fd())?;
            }
            libc::S_IFREG => {
                let inode = self.inode(attr.ino)?;
                let (from, _) = self.open_data(&inode, OFlags::RDONLY)?;
                self.make_file_copy(dst, name, &from, attr.size, CopyData::Yes)?;
            }
            libc::S_IFLNK => {
                let target = self.readlink(attr.ino)?;
                sys::fs::symlink_at(&target, dst, name)?;
            }
            kind => sys::fs::mknod_at(dst, name, kind | perm, attr.rdev)?,
        }
        sys::fs::chown_at(dst, name, Some(attr.uid), Some(attr.gid))?;
        if attr.kind() != libc::S_IFLNK {
            sys::fs::chmod_at(dst, name, perm)?;
        }
        if self.opts.xattrs {
            for x in self.listxattr(attr.ino).unwrap_or_default() {
                let Ok(value) = self.getxattr(attr.ino, &x) else {
                    continue;
                };
                if let Err(e) = sys::xattr::set(Target::Entry(dst, name), &x, &value, 0) {
                    log::warn!("filling a volume: xattr {x:?} of {name:?} not copied: {e}");
                }
            }
        }
        let at = |t: Time| TimeSpec::At {
            sec: t.sec,
            nsec: t.nsec,
        };
        Ok(sys::fs::utimens_at(
            dst,
            name,
            at(attr.atime),
            at(attr.mtime),
        )?)
    }
}

/// Whether a directory has no entries.
pub(super) fn is_empty(dir: BorrowedFd<'_>) -> Result<bool> {
    Ok(sys::fs::read_dir(dir)?.is_empty())
}
