//! Namespace operations (the kernel's dir.c): create, mkdir, mknod, symlink, link,
//! unlink, rmdir, rename.
//!
//! Invariants:
//! - A new entry over a whiteout is built in the work directory and renamed into
//!   place, so the whiteout is replaced atomically; a new directory there is opaque
//!   (it must not show what the whiteout hid).
//! - Removing or moving away an entry that also exists in a lower layer leaves a
//!   whiteout in the same step where the filesystem allows it (rename over the
//!   entry, RENAME_WHITEOUT); with AUFS whiteouts the marker is written first, so a
//!   crash in between leaves the old entry visible, never the lower one.
//! - ENOTEMPTY is judged on the merged view.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use rustix::fs::OFlags;

use super::copy_up::CopyData;
use super::inode::Inode;
use super::inode_flags::Change;
use super::lookup::Found;
use super::override_stat::Kind;
use super::whiteout::{
    self, OPAQUE_MARKER, WhiteoutStyle, is_reserved_name, is_whiteout_stat, whiteout_name,
    whiteout_target,
};
use super::{Caller, Entry, Errno, Ino, OpenFile, RenameMode, Result, UPPER, Union, WithContext};
use crate::sys::{self, fs::RenameKind, xattr::Target};

/// What the upper directory holds at a name.
enum Slot {
    Free,
    CharWhiteout,
    AufsWhiteout,
    Occupied,
}

/// An AUFS whiteout counts even in a directory with no layers below, where it hides
/// nothing: a new entry replaces it, so that the upper layer never holds a name and
/// its whiteout side by side (which tools applying the layer as an image diff read
/// in either order).
fn upper_slot(dir: BorrowedFd<'_>, name: &OsStr) -> Result<Slot> {
    Ok(match whiteout::probe(dir, name, true)? {
        whiteout::Probe::Entry(_) => Slot::Occupied,
        whiteout::Probe::CharWhiteout => Slot::CharWhiteout,
        whiteout::Probe::AufsWhiteout => Slot::AufsWhiteout,
        whiteout::Probe::Missing => Slot::Free,
    })
}

/// Owner and extra mode bits of a new entry: the caller's, except that a set-group-ID
/// directory passes on its group (and, to directories, the set-group-ID bit).
pub(crate) fn new_owner(caller: Caller, parent: &sys::fs::Stat, is_dir: bool) -> (u32, u32, u32) {
    if parent.st_mode & libc::S_ISGID != 0 {
        (
            caller.uid,
            parent.st_gid,
            if is_dir { libc::S_ISGID } else { 0 },
        )
    } else {
        (caller.uid, caller.gid, 0)
    }
}

/// Gives a freshly made entry its owner, then its mode (chown clears set-ID bits,
/// so the mode goes second).
pub(crate) fn set_owner_and_mode(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    uid: u32,
    gid: u32,
    mode: Option<u32>,
) -> sys::SysResult<()> {
    sys::fs::chown_at(dir, name, Some(uid), Some(gid))?;
    if let Some(mode) = mode {
        sys::fs::chmod_at(dir, name, mode)?;
    }
    Ok(())
}

impl Union {
    /// Common checks of every operation that makes a new name; returns the parent,
    /// copied up.
    fn prepare_new_name(&self, parent: Ino, name: &OsStr) -> Result<Arc<Inode>> {
        self.check_writable()?;
        sys::fs::check_component(name)?;
        if is_reserved_name(name) {
            return Err(Errno::INVAL.into());
        }
        let p = self.inode(parent)?;
        if !p.is_dir() {
            return Err(Errno::NOTDIR.into());
        }
        // A directory with no layer below its upper one (made through the mount, or
        // opaque) shows exactly what its upper directory holds, which `install`
        // checks anyway: only a merged one needs the lookup.
        let upper_only = p.state.read().layer_indexes() == [UPPER];
        if !upper_only && self.resolve(&p, name)?.is_some() {
            return Err(Errno::EXIST.into());
        }
        self.copy_up(&p, CopyData::Yes)?;
        Ok(p)
    }

    /// Publishes a new entry `name` in the upper copy of `parent`. `make` creates it
    /// (with owner and mode) under the directory and name it is given: in place when
    /// the name is free, in the work directory when a whiteout must be replaced.
    fn install(
        &self,
        parent: &Inode,
        name: &OsStr,
        is_dir: bool,
        make: &mut dyn FnMut(BorrowedFd<'_>, &OsStr) -> Result<()>,
    ) -> Result<()> {
        let ufd = self.dir_fd(parent, UPPER)?;
        let slot = upper_slot(ufd.as_fd(), name)?;
        if let Slot::Occupied = slot {
            return Err(Errno::EXIST.into());
        }
        if let Slot::Free = slot {
            return make(ufd.as_fd(), name);
        }
        let kind = match slot {
            Slot::CharWhiteout if is_dir => RenameKind::Exchange,
            Slot::CharWhiteout => RenameKind::Replace,
            _ => RenameKind::NoReplace,
        };
        self.publish_from_work(
            |work, temp| {
                make(work, temp)?;
                if is_dir {
                    whiteout::mark_opaque(sys::fs::open_dir(work, temp)?.as_fd())?;
                }
                Ok(())
            },
            ufd.as_fd(),
            name,
            kind,
        )?;
        if let Slot::AufsWhiteout = slot {
            sys::fs::unlink_at(ufd.as_fd(), &whiteout_name(name))?;
        }
        Ok(())
    }

    /// Looks the just-made entry up, giving the kernel its reference.
    fn entry_after_create(&self, parent: &Inode, name: &OsStr) -> Result<Entry> {
        let found = self.resolve(parent, name)?.ok_or(Errno::NOENT)?;
        let inode = self.adopt(parent.ino, name, found)?;
        let attr = self.getattr(inode.ino)?;
        Ok(Entry {
            attr,
            ttl: self.opts.ttl,
        })
    }

    /// The upper parent's stat with its stored owner and mode (override included), for
    /// the set-group-ID inheritance of new entries.
    fn parent_upper_stat(&self, parent: &Inode) -> Result<sys::fs::Stat> {
        let fd = self.dir_fd(parent, UPPER)?;
        let st = sys::fs::fstat(fd.as_fd())?;
        Ok(self.owner.stored_stat(Target::Fd(fd.as_fd()), st))
    }

    /// [`Union::create`] in a merged directory.
    pub(crate) fn merged_create(
        &self,
        caller: Caller,
        parent: Ino,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> Result<(Entry, u64, Arc<OpenFile>)> {
        let p = self.prepare_new_name(parent, name)?;
        let caller = self.owner.stored_caller(caller);
        let (uid, gid, _) = new_owner(caller, &self.parent_upper_stat(&p)?, false);
        let perm = mode & 0o7777;
        let setid = perm & (libc::S_ISUID | libc::S_ISGID) != 0;
        let mut opened: Option<(File, Option<sys::fs::Stat>)> = None;
        self.install(&p, name, false, &mut |dir, n| {
            let file =
                sys::fs::open_at(dir, n, OFlags::RDWR | OFlags::CREATE | OFlags::EXCL, perm)?;
            // The file was made with the daemon's ids and exactly `perm` (the daemon
            // runs with umask 0): most often already the owner it must get.
            let mut st = sys::fs::fstat(file.as_fd())?;
            if self.owner.writes_overrides() || setid || (st.st_uid, st.st_gid) != (uid, gid) {
                self.owner
                    .give(Target::Open(file.as_fd()), uid, gid, perm, setid, None)?;
                st = sys::fs::fstat(file.as_fd())?;
            }
            // Made in the work directory, it changes (ctime) when moved into place.
            let in_place = n == name;
            opened = Some((file, in_place.then_some(st)));
            Ok(())
        })?;
        let (file, st) = opened.ok_or(Errno::IO)?;
        // The file just made is the upper entry at `name` (the kernel holds the
        // parent's lock across a create, so no other request moves it meanwhile): its
        // own fd gives what a lookup would find, and a file made here has no origin.
        let st = match st {
            Some(st) => st,
            None => sys::fs::fstat(file.as_fd())?,
        };
        let found = Found {
            kind: libc::S_IFREG,
            stat: st,
            layers: vec![super::inode::LayerRef {
                layer: UPPER,
                fd: None,
            }],
            redirect: None,
            chained: false,
        };
        let inode = self.adopt_made(p.ino, name, found)?;
        let entry = Entry {
            attr: self.attr_from_stat_of(&inode, UPPER, &st)?,
            ttl: self.opts.ttl,
        };
        let (fh, handle) =
            self.register_file(entry.attr.ino, file, Some(st.st_mode), true, true, true);
        let _ = flags;
        Ok((entry, fh, handle))
    }

    pub(crate) fn merged_mkdir(
        &self,
        caller: Caller,
        parent: Ino,
        name: &OsStr,
        mode: u32,
    ) -> Result<Entry> {
        let p = self.prepare_new_name(parent, name)?;
        let caller = self.owner.stored_caller(caller);
        let (uid, gid, extra) = new_owner(caller, &self.parent_upper_stat(&p)?, true);
        let perm = (mode & 0o7777) | extra;
        self.install(&p, name, true, &mut |dir, n| {
            sys::fs::mkdir_at(dir, n, perm)?;
            self.owner
                .give(Target::Entry(dir, n), uid, gid, perm, true, None)
        })?;
        self.entry_after_create(&p, name)
    }

    pub(crate) fn merged_mknod(
        &self,
        caller: Caller,
        parent: Ino,
        name: &OsStr,
        mode: u32,
        rdev: u64,
    ) -> Result<Entry> {
        let kind = mode & libc::S_IFMT;
        // A char device 0/0 is a whiteout in the overlay format: creating one would
        // make the name vanish. Kernel overlayfs refuses it the same way.
        if kind == libc::S_IFCHR && rdev == 0 {
            return Err(Errno::PERM.into());
        }
        let p = self.prepare_new_name(parent, name)?;
        let caller = self.owner.stored_caller(caller);
        let (uid, gid, _) = new_owner(caller, &self.parent_upper_stat(&p)?, false);
        let perm = mode & 0o7777;
        let regular = |dir: BorrowedFd<'_>, n: &OsStr| {
            sys::fs::open_at(dir, n, OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL, perm).map(drop)
        };
        self.install(&p, name, false, &mut |dir, n| {
            let mut stands_for = None;
            if kind == libc::S_IFREG || kind == 0 {
                regular(dir, n)?;
            } else {
                match sys::fs::mknod_at(dir, n, kind | perm, rdev) {
                    Ok(()) => {}
                    // Without CAP_MKNOD a device is kept as a regular file whose
                    // override xattr records what it stands for.
                    Err(Errno::PERM) if self.owner.writes_overrides() => {
                        regular(dir, n)?;
                        stands_for = Kind::from_mode(kind, rdev);
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            let setid = perm & (libc::S_ISUID | libc::S_ISGID) != 0;
            self.owner
                .give(Target::Entry(dir, n), uid, gid, perm, setid, stands_for)
        })?;
        self.entry_after_create(&p, name)
    }

    pub(crate) fn merged_symlink(
        &self,
        caller: Caller,
        parent: Ino,
        name: &OsStr,
        target: &OsStr,
    ) -> Result<Entry> {
        let p = self.prepare_new_name(parent, name)?;
        let caller = self.owner.stored_caller(caller);
        let (uid, gid, _) = new_owner(caller, &self.parent_upper_stat(&p)?, false);
        self.install(&p, name, false, &mut |dir, n| {
            sys::fs::symlink_at(target, dir, n)?;
            self.owner
                .give(Target::Entry(dir, n), uid, gid, 0o777, false, None)
        })?;
        self.entry_after_create(&p, name)
    }

    /// Makes `newname` in `newparent` another name of `ino` (copied up first, so that
    /// both names share the upper file).
    pub(crate) fn merged_link(&self, ino: Ino, newparent: Ino, newname: &OsStr) -> Result<Entry> {
        let inode = self.inode(ino)?;
        if inode.is_dir() {
            return Err(Errno::PERM.into());
        }
        let p = self.prepare_new_name(newparent, newname)?;
        self.copy_up(&inode, CopyData::Yes)?;
        // By a name that leads to the file, or, when the kernel reached it by a name
        // this daemon never saw (a hard link made outside the mount), by its pinned
        // handle.
        enum Source {
            Name(Arc<OwnedFd>, std::ffi::OsString),
            Pinned(Arc<OwnedFd>),
        }
        let source = match self.entry_loc(&inode) {
            Ok((dir, name, _)) => Source::Name(dir, name),
            Err(e) if e == Errno::NOENT => Source::Pinned(
                inode
                    .state
                    .read()
                    .pinned_if_detached()
                    .ok_or(Errno::NOENT)?,
            ),
            Err(e) => return Err(e),
        };
        self.install(&p, newname, false, &mut |dir, n| {
            Ok(match &source {
                Source::Name(src_dir, src_name) => {
                    sys::fs::link_at(src_dir.as_fd(), src_name, dir, n)
                }
                Source::Pinned(pinned) => sys::fs::link_fd(pinned.as_fd(), dir, n),
            }?)
        })?;
        self.entry_after_create(&p, newname)
    }

    pub fn readlink(&self, ino: Ino) -> Result<std::ffi::OsString> {
        let inode = self.inode(ino)?;
        if inode.kind != libc::S_IFLNK {
            return Err(Errno::INVAL.into());
        }
        let (pfd, name, _) = self.entry_loc(&inode)?;
        Ok(sys::fs::readlink_at(pfd.as_fd(), &name)?)
    }

    /// unlink (`dir` false) or rmdir in a merged directory.
    pub(crate) fn merged_remove(&self, parent: Ino, name: &OsStr, dir: bool) -> Result<()> {
        self.check_writable()?;
        sys::fs::check_component(name)?;
        let p = self.inode(parent)?;
        if !p.is_dir() {
            return Err(Errno::NOTDIR.into());
        }
        let found = self.resolve_linking(&p, name)?.ok_or(Errno::NOENT)?;
        let is_dir = found.kind == libc::S_IFDIR;
        match (dir, is_dir) {
            (true, false) => return Err(Errno::NOTDIR.into()),
            (false, true) => return Err(Errno::ISDIR.into()),
            _ => {}
        }
        let child = self
            .inodes
            .by_identity((found.stat.st_dev, found.stat.st_ino));
        if is_dir {
            let scratch;
            let probe = match &child {
                Some(c) => c.clone(),
                None => {
                    scratch = self.adopt(parent, name, found.clone())?;
                    self.inodes.forget(scratch.ino, 1);
                    scratch
                }
            };
            if !self.is_empty_dir(&probe)? {
                return Err(Errno::NOTEMPTY.into());
            }
        }
        if found.kind == libc::S_IFREG && found.top_layer() != UPPER {
            // A lower file goes by a whiteout, which its flags would not refuse.
            let dir = self.dir_fd(&p, found.top_layer())?;
            self.refuse_protected_at(dir.as_fd(), name, Change::Modify)?;
        }
        self.copy_up(&p, CopyData::Yes)?;
        let pinned = match (&child, is_dir) {
            (Some(_), false) => pin_entry(self.dir_fd(&p, found.top_layer())?.as_fd(), name),
            _ => None,
        };
        // A name of a lower hard-link group: its other names then show one link
        // less (see removed_links.rs).
        let removal = self.removing_link(&p, name, found.top_layer(), &found.stat)?;
        self.remove_entry(&p, name, &found)?;
        self.removed_link(removal);
        if let Some(c) = child {
            c.detach_if_named(parent, name, pinned);
        }
        Ok(())
    }

    /// Removes `name` (resolved as `found`) from the merged view of `parent`, whose
    /// upper copy exists. A directory must already be known to be empty there.
    fn remove_entry(&self, parent: &Inode, name: &OsStr, found: &Found) -> Result<()> {
        let ufd = self.dir_fd(parent, UPPER)?;
        let in_upper = found.top_layer() == UPPER;
        // An entry found below the upper layer is there: no need to look again.
        let needs_whiteout = !in_upper || self.lower_has(parent, name)?;
        let is_dir = found.kind == libc::S_IFDIR;
        if needs_whiteout {
            log::debug!("whiteout {}", self.describe(parent.ino, Some(name)));
        }
        if !in_upper {
            return self
                .make_whiteout(ufd.as_fd(), name)
                .doing("writing a whiteout");
        }
        if needs_whiteout && self.whiteout_style == WhiteoutStyle::CharDevice {
            // An emptied directory exchanged out holds only whiteouts and markers;
            // publish_from_work removes it from the work directory.
            let kind = if is_dir {
                RenameKind::Exchange
            } else {
                RenameKind::Replace
            };
            return self
                .publish_from_work(
                    |work, temp| self.make_whiteout(work, temp),
                    ufd.as_fd(),
                    name,
                    kind,
                )
                .doing("replacing an upper entry by a whiteout");
        }
        if needs_whiteout {
            whiteout::write_whiteout(ufd.as_fd(), name, WhiteoutStyle::AufsFile)
                .doing("writing a whiteout")?;
        }
        if is_dir {
            let sub = sys::fs::open_dir(ufd.as_fd(), name)?;
            clear_markers(sub.as_fd()).doing("clearing the markers of a directory")?;
            drop(sub);
            Ok(sys::fs::rmdir_at(ufd.as_fd(), name)?)
        } else {
            Ok(sys::fs::unlink_at(ufd.as_fd(), name)?)
        }
    }

    /// Finds the inode of a resolved entry, creating one (with a reference the caller
    /// must drop) when the kernel does not hold it.
    fn inode_for(&self, parent: Ino, name: &OsStr, found: &Found) -> Result<(Arc<Inode>, bool)> {
        match self
            .inodes
            .by_identity((found.stat.st_dev, found.stat.st_ino))
        {
            Some(i) if i.kind == found.kind => Ok((i, false)),
            _ => Ok((self.adopt(parent, name, found.clone())?, true)),
        }
    }

    pub(crate) fn merged_rename(
        &self,
        parent: Ino,
        name: &OsStr,
        newparent: Ino,
        newname: &OsStr,
        mode: RenameMode,
    ) -> Result<()> {
        self.check_writable()?;
        sys::fs::check_component(name)?;
        sys::fs::check_component(newname)?;
        if is_reserved_name(newname) {
            return Err(Errno::INVAL.into());
        }
        let p = self.inode(parent)?;
        let q = self.inode(newparent)?;
        if !p.is_dir() || !q.is_dir() {
            return Err(Errno::NOTDIR.into());
        }
        let src = self.resolve_linking(&p, name)?.ok_or(Errno::NOENT)?;
        let dst = self.resolve_linking(&q, newname)?;
        match (mode, &dst) {
            (RenameMode::NoReplace, Some(_)) => return Err(Errno::EXIST.into()),
            (RenameMode::Exchange, None) => return Err(Errno::NOENT.into()),
            _ => {}
        }
        let (src_inode, src_temp) = self.inode_for(parent, name, &src)?;
        let dst_pair = match &dst {
            Some(d) => Some(self.inode_for(newparent, newname, d)?),
            None => None,
        };
        let result = self.rename_resolved(
            &p,
            name,
            &q,
            newname,
            mode,
            &src,
            &src_inode,
            dst.as_ref(),
            dst_pair.as_ref().map(|d| &d.0),
        );
        if src_temp {
            self.inodes.forget(src_inode.ino, 1);
        }
        if let Some((d, true)) = &dst_pair {
            self.inodes.forget(d.ino, 1);
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn rename_resolved(
        &self,
        p: &Inode,
        name: &OsStr,
        q: &Inode,
        newname: &OsStr,
        mode: RenameMode,
        src: &Found,
        src_inode: &Arc<Inode>,
        dst: Option<&Found>,
        dst_inode: Option<&Arc<Inode>>,
    ) -> Result<()> {
        if Arc::ptr_eq(src_inode, dst_inode.unwrap_or(src_inode)) && dst.is_some() {
            // Two names of one object (or the same name): rename(2) does nothing.
            return Ok(());
        }
        let src_dir = src.kind == libc::S_IFDIR;
        let has_lower = |f: &Found| f.layers.iter().any(|l| l.layer != UPPER || !self.upper);
        // A directory with lower content moves by its upper copy plus a redirect to
        // that content; one without needs only to hide what its new name had below.
        let src_redirect = src_dir && has_lower(src);
        let dst_redirect = mode == RenameMode::Exchange
            && dst.is_some_and(|d| d.kind == libc::S_IFDIR && has_lower(d));
        if (src_redirect || dst_redirect) && !self.opts.redirect_dir {
            // As kernel overlayfs with redirect_dir=off: `mv` then copies.
            return Err(Errno::XDEV.into());
        }
        if let (Some(d), Some(di)) = (dst, dst_inode) {
            let dst_dir = d.kind == libc::S_IFDIR;
            if mode != RenameMode::Exchange {
                if src_dir && !dst_dir {
                    return Err(Errno::NOTDIR.into());
                }
                if !src_dir && dst_dir {
                    return Err(Errno::ISDIR.into());
                }
                if dst_dir && !self.is_empty_dir(di)? {
                    return Err(Errno::NOTEMPTY.into());
                }
            }
        }
        if let (Some(di), false) = (dst_inode, mode == RenameMode::Exchange) {
            // A replaced lower file goes by a whiteout, which its flags would not refuse.
            self.refuse_protected(di, Change::Modify)?;
        }
        self.copy_up(src_inode, CopyData::Yes)?;
        self.link_group_name(p, name, src)?;
        self.copy_up(q, CopyData::Yes)?;
        if mode == RenameMode::Exchange {
            if let (Some(di), Some(d)) = (dst_inode, dst) {
                self.copy_up(di, CopyData::Yes)?;
                self.link_group_name(q, newname, d)?;
            }
        }
        let pfd = self.dir_fd(p, UPPER)?;
        let qfd = self.dir_fd(q, UPPER)?;
        let src_origin = match src_redirect {
            true => Some(self.redirect_before_move(src_inode)?),
            false => None,
        };

        if mode == RenameMode::Exchange {
            let dst_inode = dst_inode.ok_or(Errno::NOENT)?;
            let dst_origin = match dst_redirect {
                true => Some(self.redirect_before_move(dst_inode)?),
                false => None,
            };
            if src_dir && !src_redirect && self.lower_has(q, newname)? {
                self.mark_moved_opaque(src_inode)?;
            }
            if dst_inode.is_dir() && !dst_redirect && self.lower_has(p, name)? {
                self.mark_moved_opaque(dst_inode)?;
            }
            sys::fs::rename_at(
                pfd.as_fd(),
                name,
                qfd.as_fd(),
                newname,
                RenameKind::Exchange,
            )?;
            src_inode.moved((p.ino, name), (q.ino, newname), src_origin);
            dst_inode.moved((q.ino, newname), (p.ino, name), dst_origin);
            self.note_moved_in(q, qfd.as_fd(), newname, src_inode);
            self.note_moved_in(p, pfd.as_fd(), name, dst_inode);
            return Ok(());
        }

        // A replaced name of a lower hard-link group counts as a removed one.
        let replaced = match dst {
            Some(d) => self.removing_link(q, newname, d.top_layer(), &d.stat)?,
            None => None,
        };
        let src_whiteout = self.lower_has(p, name)?;
        if src_whiteout {
            log::debug!(
                "whiteout {} (renamed away)",
                self.describe(p.ino, Some(name))
            );
        }
        if src_dir && !src_redirect && self.lower_has(q, newname)? {
            self.mark_moved_opaque(src_inode)?;
        }
        let mut pinned = None;
        if let (Some(d), Some(di)) = (dst, dst_inode) {
            if d.top_layer() == UPPER && self.upper {
                if di.is_dir() {
                    clear_markers(self.dir_fd(di, UPPER)?.as_fd())?;
                } else {
                    pinned = pin_entry(qfd.as_fd(), newname);
                }
            }
        }
        match upper_slot(qfd.as_fd(), newname)? {
            Slot::CharWhiteout if src_dir => {
                // A directory cannot replace a char device: swap them instead, which
                // leaves the whiteout at the source, where it is wanted or removed.
                sys::fs::rename_at(
                    pfd.as_fd(),
                    name,
                    qfd.as_fd(),
                    newname,
                    RenameKind::Exchange,
                )?;
                if !src_whiteout {
                    sys::fs::unlink_at(pfd.as_fd(), name)?;
                }
            }
            Slot::AufsWhiteout => {
                self.move_entry(pfd.as_fd(), name, qfd.as_fd(), newname, src_whiteout)?;
                sys::fs::unlink_at(qfd.as_fd(), &whiteout_name(newname))?;
            }
            _ => self.move_entry(pfd.as_fd(), name, qfd.as_fd(), newname, src_whiteout)?,
        }
        src_inode.moved((p.ino, name), (q.ino, newname), src_origin);
        self.note_moved_in(q, qfd.as_fd(), newname, src_inode);
        self.removed_link(replaced);
        if let Some(di) = dst_inode {
            di.detach_if_named(q.ino, newname, pinned);
        }
        Ok(())
    }

    /// Makes the upper directory `dir`, about to be moved over a name with lower
    /// content, opaque: that content must not show through under it.
    fn mark_moved_opaque(&self, dir: &Inode) -> Result<()> {
        log::debug!("opaque {}", self.describe(dir.ino, None));
        whiteout::mark_opaque(self.dir_fd(dir, UPPER)?.as_fd()).doing("marking a directory opaque")
    }

    /// Writes the redirect a directory with lower content needs before its upper copy
    /// is renamed; returns it.
    fn redirect_before_move(&self, dir: &Inode) -> Result<std::ffi::OsString> {
        let origin = self.lower_path(dir)?;
        log::debug!(
            "redirect {}: lower content at {origin:?}",
            self.describe(dir.ino, None)
        );
        self.set_redirect(self.dir_fd(dir, UPPER)?.as_fd(), &origin)?;
        Ok(origin)
    }

    /// An entry shown with its origin's number and moved into an upper-only directory
    /// makes that directory impure, so that listings read the number (see origin.rs).
    fn note_moved_in(&self, dir: &Inode, dir_fd: BorrowedFd<'_>, name: &OsStr, moved: &Inode) {
        if dir.state.read().merges_layers() {
            return;
        }
        let own_number = sys::fs::stat_at(dir_fd, name)
            .map(|st| self.derived_ino(UPPER, st.st_ino) == moved.ino)
            .unwrap_or(true);
        if !own_number {
            self.mark_impure(dir_fd);
        }
    }

    /// rename(2) in the upper layer, leaving a whiteout at the source when asked.
    fn move_entry(
        &self,
        from_dir: BorrowedFd<'_>,
        from: &OsStr,
        to_dir: BorrowedFd<'_>,
        to: &OsStr,
        whiteout_source: bool,
    ) -> sys::SysResult<()> {
        if !whiteout_source {
            return sys::fs::rename_at(from_dir, from, to_dir, to, RenameKind::Replace);
        }
        if self.whiteout_style == WhiteoutStyle::CharDevice {
            match sys::fs::rename_at(from_dir, from, to_dir, to, RenameKind::Whiteout) {
                Err(Errno::INVAL) | Err(Errno::PERM) | Err(Errno::OPNOTSUPP) => {}
                other => return other,
            }
        }
        whiteout::write_whiteout(from_dir, from, WhiteoutStyle::AufsFile)?;
        sys::fs::rename_at(from_dir, from, to_dir, to, RenameKind::Replace)
    }
}

/// An O_PATH handle on an upper entry about to lose its name, so that getattr of the
/// inode still works (and reports nlink 0) while the kernel holds it. Best effort.
pub(crate) fn pin_entry(dir: BorrowedFd<'_>, name: &OsStr) -> Option<Arc<OwnedFd>> {
    sys::fs::open_at(dir, name, OFlags::PATH, 0)
        .ok()
        .map(|f| Arc::new(OwnedFd::from(f)))
}

/// Empties an upper directory that is empty in the merged view: only whiteouts and
/// opaque markers may remain in it; anything else means the view was wrong.
fn clear_markers(dir: BorrowedFd<'_>) -> Result<()> {
    for entry in sys::fs::read_dir(dir)? {
        let is_marker = entry.name == OPAQUE_MARKER || whiteout_target(&entry.name).is_some();
        let is_char_whiteout = !is_marker
            && (entry.kind == libc::S_IFCHR || entry.kind == 0)
            && sys::fs::stat_at(dir, &entry.name)
                .map(|st| is_whiteout_stat(st.st_mode, st.st_rdev))
                .unwrap_or(false);
        if !is_marker && !is_char_whiteout {
            return Err(Errno::NOTEMPTY.into());
        }
        sys::fs::unlink_at(dir, &entry.name)?;
    }
    Ok(())
}
