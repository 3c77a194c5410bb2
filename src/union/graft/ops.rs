//! Namespace operations under a graft: each is the plain syscall in the graft's
//! directory (no whiteouts, no staging), plus the inode bookkeeping the engine
//! keeps for every name (detached entries, new names after a rename) and the size
//! accounting of limited volumes. Crossing a graft boundary answers EXDEV; moving or
//! removing a graft point or one of its ancestors answers EBUSY.

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use rustix::fs::OFlags;

use super::tagged_key;
use crate::sys::{self, fs::RenameKind, fs::Stat};
use crate::union::dir_ops::{new_owner, pin_entry, set_owner_and_mode};
use crate::union::inode::Inode;
use crate::union::{Caller, Entry, Errno, OpenFile, RenameMode, Result, Union};

impl Union {
    /// The graft directory `parent`, checked for making `name` in it.
    fn graft_new_name(&self, p: &Inode, gi: usize, name: &OsStr) -> Result<Arc<OwnedFd>> {
        sys::fs::check_component(name)?;
        self.graft_check_writable(gi)?;
        self.dir_fd(p, self.grafts.list[gi].layer)
    }

    pub(crate) fn graft_create(
        &self,
        caller: Caller,
        (p, gi): (&Inode, usize),
        name: &OsStr,
        mode: u32,
    ) -> Result<(Entry, u64, Arc<OpenFile>)> {
        let pfd = self.graft_new_name(p, gi, name)?;
        let (uid, gid, _) = new_owner(caller, &sys::fs::fstat(pfd.as_fd())?, false);
        let perm = mode & 0o7777;
        let file = sys::fs::open_at(
            pfd.as_fd(),
            name,
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL,
            perm,
        )?;
        sys::fs::fchown(file.as_fd(), Some(uid), Some(gid))?;
        if perm & (libc::S_ISUID | libc::S_ISGID) != 0 {
            sys::fs::chmod_fd(file.as_fd(), perm)?;
        }
        let entry = self.graft_child(p, name)?;
        let (fh, handle) = self.register_file(entry.attr.ino, file, None, true, true, true);
        Ok((entry, fh, handle))
    }

    pub(crate) fn graft_mkdir(
        &self,
        caller: Caller,
        (p, gi): (&Inode, usize),
        name: &OsStr,
        mode: u32,
    ) -> Result<Entry> {
        let pfd = self.graft_new_name(p, gi, name)?;
        let (uid, gid, extra) = new_owner(caller, &sys::fs::fstat(pfd.as_fd())?, true);
        let perm = (mode & 0o7777) | extra;
        sys::fs::mkdir_at(pfd.as_fd(), name, perm)?;
        set_owner_and_mode(pfd.as_fd(), name, uid, gid, Some(perm))?;
        self.graft_child(p, name)
    }

    pub(crate) fn graft_mknod(
        &self,
        caller: Caller,
        (p, gi): (&Inode, usize),
        name: &OsStr,
        mode: u32,
        rdev: u64,
    ) -> Result<Entry> {
        let pfd = self.graft_new_name(p, gi, name)?;
        let (uid, gid, _) = new_owner(caller, &sys::fs::fstat(pfd.as_fd())?, false);
        let kind = mode & libc::S_IFMT;
        let perm = mode & 0o7777;
        if kind == libc::S_IFREG || kind == 0 {
            drop(sys::fs::open_at(
                pfd.as_fd(),
                name,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
                perm,
            )?);
        } else {
            sys::fs::mknod_at(pfd.as_fd(), name, kind | perm, rdev)?;
        }
        let setid = perm & (libc::S_ISUID | libc::S_ISGID) != 0;
        set_owner_and_mode(pfd.as_fd(), name, uid, gid, setid.then_some(perm))?;
        self.graft_child(p, name)
    }

    pub(crate) fn graft_symlink(
        &self,
        caller: Caller,
        (p, gi): (&Inode, usize),
        name: &OsStr,
        target: &OsStr,
    ) -> Result<Entry> {
        let pfd = self.graft_new_name(p, gi, name)?;
        let (uid, gid, _) = new_owner(caller, &sys::fs::fstat(pfd.as_fd())?, false);
        let quota = self.grafts.list[gi].quota.as_ref();
        let len = target.len() as u64;
        if let Some(q) = quota {
            q.reserve(len)?;
        }
        let made = sys::fs::symlink_at(target, pfd.as_fd(), name)
            .and_then(|()| set_owner_and_mode(pfd.as_fd(), name, uid, gid, None));
        if let (Err(_), Some(q)) = (&made, quota) {
            q.adjust(-(len as i64));
        }
        made?;
        self.graft_child(p, name)
    }

    /// link within graft `gi`: `inode` and the new parent `p` both lie in it.
    pub(crate) fn graft_link(
        &self,
        inode: &Inode,
        (p, gi): (&Inode, usize),
        newname: &OsStr,
    ) -> Result<Entry> {
        if inode.is_dir() {
            return Err(Errno::PERM.into());
        }
        let pfd = self.graft_new_name(p, gi, newname)?;
        let (src_dir, src_name, _) = self.entry_loc(inode)?;
        sys::fs::link_at(src_dir.as_fd(), &src_name, pfd.as_fd(), newname)?;
        self.graft_child(p, newname)
    }

    /// unlink/rmdir of `name` in the graft directory `p`: the plain removal.
    pub(crate) fn graft_remove(
        &self,
        (p, gi): (&Inode, usize),
        name: &OsStr,
        dir: bool,
    ) -> Result<()> {
        sys::fs::check_component(name)?;
        self.graft_check_writable(gi)?;
        let layer = self.grafts.list[gi].layer;
        let pfd = self.dir_fd(p, layer)?;
        let st = sys::fs::stat_at(pfd.as_fd(), name)?;
        let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
        match (dir, is_dir) {
            (true, false) => return Err(Errno::NOTDIR.into()),
            (false, true) => return Err(Errno::ISDIR.into()),
            _ => {}
        }
        let child = self.inodes.by_identity(tagged_key(layer, &st));
        let pinned = match (&child, is_dir) {
            (Some(_), false) => pin_entry(pfd.as_fd(), name),
            _ => None,
        };
        if is_dir {
            sys::fs::rmdir_at(pfd.as_fd(), name)?;
        } else {
            sys::fs::unlink_at(pfd.as_fd(), name)?;
            self.graft_release_space(gi, &st);
        }
        if let Some(c) = child {
            c.detach_if_named(p.ino, name, pinned);
        }
        Ok(())
    }

    /// Gives back the bytes of a removed last link.
    fn graft_release_space(&self, gi: usize, st: &Stat) {
        let kind = st.st_mode & libc::S_IFMT;
        if let Some(q) = &self.grafts.list[gi].quota {
            if (kind == libc::S_IFREG || kind == libc::S_IFLNK) && st.st_nlink <= 1 {
                q.adjust(-st.st_size);
            }
        }
    }

    /// rename within graft `gi`: both parents, `p` and `q`, lie in it.
    pub(crate) fn graft_rename(
        &self,
        (p, gi): (&Inode, usize),
        name: &OsStr,
        q: &Inode,
        newname: &OsStr,
        mode: RenameMode,
    ) -> Result<()> {
        let (parent, newparent) = (p.ino, q.ino);
        sys::fs::check_component(name)?;
        sys::fs::check_component(newname)?;
        self.graft_check_writable(gi)?;
        let layer = self.grafts.list[gi].layer;
        let pfd = self.dir_fd(p, layer)?;
        let qfd = self.dir_fd(q, layer)?;
        let src_st = sys::fs::stat_at(pfd.as_fd(), name)?;
        let dst_st = match sys::fs::stat_at(qfd.as_fd(), newname) {
            Ok(st) => Some(st),
            Err(Errno::NOENT) => None,
            Err(e) => return Err(e.into()),
        };
        let same = dst_st
            .as_ref()
            .is_some_and(|d| (d.st_dev, d.st_ino) == (src_st.st_dev, src_st.st_ino));
        let src_inode = self.inodes.by_identity(tagged_key(layer, &src_st));
        let dst_inode = dst_st
            .as_ref()
            .and_then(|d| self.inodes.by_identity(tagged_key(layer, d)));
        let kind = match mode {
            RenameMode::Replace => RenameKind::Replace,
            RenameMode::NoReplace => RenameKind::NoReplace,
            RenameMode::Exchange => RenameKind::Exchange,
        };
        let pinned = match (&dst_inode, &dst_st) {
            (Some(_), Some(d)) if mode != RenameMode::Exchange && !same => {
                if d.st_mode & libc::S_IFMT != libc::S_IFDIR {
                    pin_entry(qfd.as_fd(), newname)
                } else {
                    None
                }
            }
            _ => None,
        };
        sys::fs::rename_at(pfd.as_fd(), name, qfd.as_fd(), newname, kind)?;
        if same {
            return Ok(());
        }
        if let Some(s) = &src_inode {
            s.moved((parent, name), (newparent, newname), None);
        }
        match (mode, dst_inode, &dst_st) {
            (RenameMode::Exchange, Some(d), _) => {
                d.moved((newparent, newname), (parent, name), None)
            }
            (RenameMode::Exchange, None, _) => {}
            (_, d, Some(st)) => {
                self.graft_release_space(gi, st);
                if let Some(d) = d {
                    d.detach_if_named(newparent, newname, pinned);
                }
            }
            _ => {}
        }
        Ok(())
    }
}
