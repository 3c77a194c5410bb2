//! Where a request goes. Every request that depends on what backs an entry is routed
//! here, once, either to the union implementation (merged directories: copy-up,
//! whiteouts, redirects; in dir_ops.rs, lookup.rs, readdir.rs, copy_up.rs) or to the
//! plain-directory implementation of a graft (graft/ops.rs, graft/mod.rs). The
//! `merged_*` functions are never called on a graft's inode and the `graft_*` ones
//! never on a merged one, so no union rule can run inside a volume.
//!
//! Requests on an inode rather than a name (getattr, setattr, open, xattrs) share one
//! implementation: they differ only in where the writable copy is, which
//! [`Union::is_in_upper`] and [`Union::copy_up_for`] answer here from the backing.
//!
//! Boundaries: a name that is a graft point in a merged directory is the graft's
//! root (and is listed as such: `graft_fix_listing` in the merged listing); a graft
//! point and its ancestors cannot be removed or renamed (EBUSY); a link or rename
//! across a graft boundary answers EXDEV, as across filesystems.

use std::ffi::OsStr;
use std::sync::Arc;

use super::copy_up::CopyData;
use super::inode::Inode;
use super::inode_flags::Change;
use super::readdir::DirEntry;
use super::{Caller, Entry, Errno, Ino, OpenFile, RenameMode, Result, UPPER, Union};
use crate::sys;

/// What backs an inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Backing {
    /// The union's layers.
    Merged,
    /// The directory of graft `gi` (a volume or a bind source).
    Graft(usize),
}

/// [`Backing`] of an inode looked up by number, with the inode for a graft's.
pub(crate) enum Route {
    Merged,
    Graft(Arc<Inode>, usize),
}

impl Union {
    /// Looks `name` up in `parent` and takes a kernel reference on the result.
    pub fn lookup(&self, parent: Ino, name: &OsStr) -> Result<Entry> {
        sys::fs::check_component(name)?;
        match self.route(parent) {
            Route::Graft(p, _) => self.graft_child(&p, name),
            Route::Merged => match self.graft_point(parent, name) {
                Some(gi) => self.graft_root_entry(gi, parent, name),
                None => self.merged_lookup(parent, name),
            },
        }
    }

    /// Creates and opens a regular file.
    pub fn create(
        &self,
        caller: Caller,
        parent: Ino,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> Result<(Entry, u64, Arc<OpenFile>)> {
        match self.route(parent) {
            Route::Graft(p, gi) => self.graft_create(caller, (&p, gi), name, mode),
            Route::Merged => self.merged_create(caller, parent, name, mode, flags),
        }
    }

    pub fn mkdir(&self, caller: Caller, parent: Ino, name: &OsStr, mode: u32) -> Result<Entry> {
        match self.route(parent) {
            Route::Graft(p, gi) => self.graft_mkdir(caller, (&p, gi), name, mode),
            Route::Merged => self.merged_mkdir(caller, parent, name, mode),
        }
    }

    pub fn mknod(
        &self,
        caller: Caller,
        parent: Ino,
        name: &OsStr,
        mode: u32,
        rdev: u64,
    ) -> Result<Entry> {
        match self.route(parent) {
            Route::Graft(p, gi) => self.graft_mknod(caller, (&p, gi), name, mode, rdev),
            Route::Merged => self.merged_mknod(caller, parent, name, mode, rdev),
        }
    }

    pub fn symlink(
        &self,
        caller: Caller,
        parent: Ino,
        name: &OsStr,
        target: &OsStr,
    ) -> Result<Entry> {
        match self.route(parent) {
            Route::Graft(p, gi) => self.graft_symlink(caller, (&p, gi), name, target),
            Route::Merged => self.merged_symlink(caller, parent, name, target),
        }
    }

    /// Makes `newname` in `newparent` another name of `ino`.
    pub fn link(&self, ino: Ino, newparent: Ino, newname: &OsStr) -> Result<Entry> {
        match (self.route(ino), self.route(newparent)) {
            (Route::Merged, Route::Merged) => self.merged_link(ino, newparent, newname),
            (Route::Graft(inode, a), Route::Graft(p, b)) if a == b => {
                self.graft_link(&inode, (&p, a), newname)
            }
            _ => Err(Errno::XDEV.into()),
        }
    }

    pub fn unlink(&self, parent: Ino, name: &OsStr) -> Result<()> {
        self.remove(parent, name, false)
    }

    pub fn rmdir(&self, parent: Ino, name: &OsStr) -> Result<()> {
        self.remove(parent, name, true)
    }

    fn remove(&self, parent: Ino, name: &OsStr, dir: bool) -> Result<()> {
        match self.route(parent) {
            Route::Graft(p, gi) => self.graft_remove((&p, gi), name, dir),
            Route::Merged if self.pins_a_graft(parent, name) => Err(Errno::BUSY.into()),
            Route::Merged => self.merged_remove(parent, name, dir),
        }
    }

    pub fn rename(
        &self,
        parent: Ino,
        name: &OsStr,
        newparent: Ino,
        newname: &OsStr,
        mode: RenameMode,
    ) -> Result<()> {
        match (self.route(parent), self.route(newparent)) {
            (Route::Merged, Route::Merged) => {
                if self.pins_a_graft(parent, name) || self.pins_a_graft(newparent, newname) {
                    return Err(Errno::BUSY.into());
                }
                self.merged_rename(parent, name, newparent, newname, mode)
            }
            (Route::Graft(p, a), Route::Graft(q, b)) if a == b => {
                self.graft_rename((&p, a), name, &q, newname, mode)
            }
            // Moving a graft point (or an ancestor) into a graft: busy before cross-device.
            (Route::Merged, Route::Graft(..)) if self.pins_a_graft(parent, name) => {
                Err(Errno::BUSY.into())
            }
            _ => Err(Errno::XDEV.into()),
        }
    }

    /// The entries of the directory `inode`, `.` and `..` first.
    pub(crate) fn snapshot(&self, inode: &Inode) -> Result<Vec<DirEntry>> {
        match self.backing(inode) {
            Backing::Graft(gi) => self.graft_snapshot(inode, gi),
            Backing::Merged => self.merged_snapshot(inode),
        }
    }

    /// Whether writes to `inode` go to the object itself: its upper copy, or a
    /// writable graft's entry (the copy all writers share).
    pub(crate) fn is_in_upper(&self, inode: &Inode) -> bool {
        match self.backing(inode) {
            Backing::Graft(gi) => !self.graft_read_only(gi),
            Backing::Merged => self.upper && inode.state.read().top_layer() == Some(UPPER),
        }
    }

    /// Makes `inode` writable for `change`: copies it (and its parents) up, or, for a
    /// graft's entry, which is written in place, checks that the graft is writable.
    pub(crate) fn copy_up_for(&self, inode: &Inode, data: CopyData, change: Change) -> Result<()> {
        self.check_writable()?;
        match self.backing(inode) {
            Backing::Graft(gi) => self.graft_check_writable(gi),
            Backing::Merged => self.merged_copy_up(inode, data, change),
        }
    }
}
