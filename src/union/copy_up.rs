//! Copy-up: making a lower entry writable by copying it into the upper layer.
//!
//! Invariants:
//! - Parents are copied up before children, as directories with their metadata.
//! - An entry is built completely in the work directory (data, owner, mode, xattrs,
//!   times, and fsync unless the mount is volatile) and only then renamed into
//!   place, so the upper layer never holds a half-copied file, even after kill -9.
//! - Sparse files stay sparse: only data extents are copied (SEEK_DATA/SEEK_HOLE),
//!   by reflink or copy_file_range where the filesystem offers them.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use rustix::fs::OFlags;

use super::inode::{Inode, ROOT_INO};
use super::inode_flags::{self, Change};
use super::override_stat;
use super::whiteout::is_private_xattr;
use super::{Errno, Error, Ino, Result, UPPER, Union, WithContext};
use crate::layer::LayerIdx;
use crate::sys::{self, fs::RenameKind, fs::TimeSpec, xattr::Target};

/// Whether a copy-up must carry the file's data (a truncate to zero need not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CopyData {
    Yes,
    No,
    /// For a metadata change: metadata only where the mount allows it (metacopy.rs),
    /// else the data too.
    Meta,
}

impl Union {
    /// Whether the upper copy holds the data too (it is no metadata-only copy).
    pub(crate) fn has_upper_data(&self, inode: &Inode) -> bool {
        let st = inode.state.read();
        self.upper && st.top_layer() == Some(UPPER) && !st.is_metacopy()
    }

    fn copied_enough(&self, inode: &Inode, data: CopyData) -> bool {
        match data {
            CopyData::Meta => self.is_in_upper(inode),
            _ => self.has_upper_data(inode),
        }
    }

    /// Ensures `inode` (and its parents) exist in the upper layer.
    ///
    /// Parents are copied iteratively, from the top-most one missing in upper down:
    /// a lower tree may be thousands of levels deep. The chain is taken again when
    /// the entry's parent changed meanwhile (a lookup by another hard link moves it
    /// to a directory that may still be below); a bounded number of times.
    pub(crate) fn copy_up(&self, inode: &Inode, data: CopyData) -> Result<()> {
        self.copy_up_for(inode, data, Change::Modify)
    }

    /// [`Union::copy_up_for`] of a merged entry: EPERM instead when the lower file's
    /// append-only or immutable flag refuses `change` (see inode_flags.rs).
    pub(crate) fn merged_copy_up(
        &self,
        inode: &Inode,
        data: CopyData,
        change: Change,
    ) -> Result<()> {
        if !self.copied_enough(inode, data) {
            self.refuse_protected(inode, change)?;
        }
        for _ in 0..8 {
            if self.copied_enough(inode, data) {
                return Ok(());
            }
            let mut missing = Vec::new();
            self.walk_up(inode, |i| {
                if i.ino == inode.ino {
                    return Ok(None);
                }
                if i.ino == ROOT_INO || self.is_in_upper(i) {
                    return Ok(Some(()));
                }
                missing.push(self.inode(i.ino)?);
                Ok(None)
            })?;
            for dir in missing.iter().rev() {
                self.copy_up_entry(dir, CopyData::Yes)?;
            }
            if self.copy_up_entry(inode, data)? {
                return Ok(());
            }
        }
        log::warn!("copy-up of inode {}: its parent kept changing", inode.ino);
        Err(Errno::AGAIN.into())
    }

    /// Copies up `inode` alone; `false` when its parent is not in upper (any more).
    fn copy_up_entry(&self, inode: &Inode, data: CopyData) -> Result<bool> {
        if self.copied_enough(inode, data) {
            return Ok(true);
        }
        let _guard = inode.copy_up.lock();
        if self.copied_enough(inode, data) {
            return Ok(true);
        }
        if self.is_in_upper(inode) {
            return self.finish_metacopy(inode, data).map(|()| true);
        }
        let (parent_ino, name, src_layer) = {
            let st = inode.state.read();
            if st.is_detached() {
                return Err(Errno::NOENT.into());
            }
            (
                st.parent(),
                Box::<OsStr>::from(st.name()),
                st.top_layer().ok_or(Errno::STALE)?,
            )
        };
        log::debug!(
            "copy-up {} from layer {src_layer} ({}){}",
            self.describe(inode.ino, None),
            self.layers
                .get(src_layer)
                .map_or(std::path::Path::new("?"), |l| &l.path)
                .display(),
            match data {
                CopyData::Yes => "",
                CopyData::No => ", without data",
                CopyData::Meta => ", metadata only where allowed",
            }
        );
        self.copy_up_from(inode, parent_ino, &name, src_layer, data)
            .map_err(|e| self.copy_up_context(e, inode, src_layer))
    }

    /// What a failed copy-up says: which entry, from which layer.
    fn copy_up_context(&self, e: Error, inode: &Inode, src_layer: LayerIdx) -> Error {
        let e = e
            .doing("copying up")
            .on(OsStr::new(&self.describe(inode.ino, None)));
        self.error_from_layer(e, src_layer)
    }

    /// [`Union::copy_up_entry`] once the entry's copy-up lock is held.
    fn copy_up_from(
        &self,
        inode: &Inode,
        parent_ino: Ino,
        name: &OsStr,
        src_layer: LayerIdx,
        data: CopyData,
    ) -> Result<bool> {
        let parent = self.inode(parent_ino)?;
        if !self.is_in_upper(&parent) {
            return Ok(false);
        }
        let src_dir = self.dir_fd(&parent, src_layer)?;
        let mut data = data;
        if !inode.is_dir() {
            let src = sys::fs::stat_at(src_dir.as_fd(), name)?;
            if src.st_nlink > 1 && self.index.is_some() {
                let data = if data == CopyData::No {
                    data
                } else {
                    CopyData::Yes
                };
                let flags = self.copy_up_linked(
                    inode,
                    &parent,
                    name,
                    src_layer,
                    (src.st_ino, self.shown_lower_nlink(&src)),
                    data,
                )?;
                self.carry_flags(inode, flags);
                return Ok(true);
            }
            if data == CopyData::Meta && !self.metacopy_allowed(&src) {
                data = CopyData::Yes;
            }
        } else {
            data = CopyData::Yes;
        }
        let dst_dir = self.dir_fd(&parent, UPPER)?;
        let mut flags = 0;
        self.publish_from_work(
            |work, temp| {
                flags = self.stage_copy(inode, src_dir.as_fd(), name, work, temp, data, None)?;
                Ok(())
            },
            dst_dir.as_fd(),
            name,
            RenameKind::NoReplace,
        )?;
        let upper_stat = sys::fs::stat_at(dst_dir.as_fd(), name)?;
        // Recorded before the layers point at the copy: an open racing with this
        // copy-up checks what it opened against the identities (file.rs).
        self.inodes
            .add_identity(inode, (upper_stat.st_dev, upper_stat.st_ino));
        {
            let mut st = inode.state.write();
            if inode.is_dir() {
                let fd = sys::fs::open_dir(dst_dir.as_fd(), name)?;
                st.dir_copied_up(Arc::new(fd));
            } else {
                // A metadata-only copy leaves the data in the source layer until a
                // writer comes.
                st.file_copied_up((data == CopyData::Meta).then_some(src_layer));
            }
        }
        if inode.is_dir() {
            if let Some(held) = self.inodes.get(inode.ino) {
                self.inodes.note_cached_fd(&held, UPPER);
            }
            self.attrs_changed(inode.ino);
        }
        self.carry_flags(inode, flags);
        Ok(true)
    }

    /// Gives a staged copy its source's owner and mode (through the owner policy),
    /// its xattrs, and the number it is shown with. `chmod` is false for symlinks.
    fn copy_metadata(
        &self,
        inode: &Inode,
        src: Target<'_>,
        dst: Target<'_>,
        st: &sys::fs::Stat,
        chmod: bool,
    ) -> Result<()> {
        self.owner.copy(src, dst, st, chmod)?;
        copy_xattrs(src, dst)?;
        self.set_origin(dst, inode.ino);
        Ok(())
    }

    /// Builds an entry under a fresh name in the work directory with `build`, then
    /// renames it to `dst_dir/dst_name`; on any failure nothing is left in the work
    /// directory and the error is returned. With [`RenameKind::Exchange`] the entry
    /// that stood at `dst_name` comes back under the fresh name and is removed with
    /// everything below it (it is a whiteout or an emptied directory being replaced).
    pub(crate) fn publish_from_work(
        &self,
        build: impl FnOnce(BorrowedFd<'_>, &OsStr) -> Result<()>,
        dst_dir: BorrowedFd<'_>,
        dst_name: &OsStr,
        kind: RenameKind,
    ) -> Result<()> {
        let work = self.work_fd()?.clone();
        let temp = self.temp_name();
        let done = build(work.as_fd(), &temp)
            .and_then(|()| {
                sys::fs::rename_at(work.as_fd(), &temp, dst_dir, dst_name, kind)
                    .doing("publishing an entry staged in the work directory")
            })
            .and_then(|()| match kind {
                RenameKind::Exchange => super::remove_tree(work.as_fd(), &temp)
                    .doing("removing the entry a staged one replaced"),
                _ => Ok(()),
            });
        if done.is_err() {
            let _ = super::remove_tree(work.as_fd(), &temp);
        }
        done
    }

    /// Builds the copy of `src_dir/name` as `work/temp`, metadata included, marked
    /// with the number it is shown with (see origin.rs). A regular file's data comes
    /// from `data_from` when given (completing a metadata-only copy), else from the
    /// source itself. Returns the source's inode flags (read from the descriptor the
    /// copy is made from, none for other kinds), which `carry_flags` gives the copy
    /// once it is in place.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn stage_copy(
        &self,
        inode: &Inode,
        src_dir: BorrowedFd<'_>,
        name: &OsStr,
        work: BorrowedFd<'_>,
        temp: &OsStr,
        data: CopyData,
        data_from: Option<&File>,
    ) -> Result<u32> {
        // A regular file's metadata comes from the opened file itself, so that data
        // and metadata are of one object even if the layer changes meanwhile.
        let (st, opened) = if inode.kind == libc::S_IFREG {
            let (src, st) = sys::fs::open_regular_at(src_dir, name, OFlags::RDONLY)?;
            (st, Some(src))
        } else {
            (sys::fs::stat_at(src_dir, name)?, None)
        };
        if st.st_mode & libc::S_IFMT != inode.kind {
            return Err(Errno::STALE.into());
        }
        let mode = st.st_mode & 0o7777;
        let times = (
            TimeSpec::At {
                sec: st.st_atime,
                nsec: st.st_atime_nsec as u32,
            },
            TimeSpec::At {
                sec: st.st_mtime,
                nsec: st.st_mtime_nsec as u32,
            },
        );
        match inode.kind {
            libc::S_IFREG => {
                let src = opened.ok_or(Errno::STALE)?;
                let flags = inode_flags::flags_of(src.as_fd())?;
                let size = st.st_size as u64;
                let dst = self.make_file_copy(work, temp, data_from.unwrap_or(&src), size, data)?;
                // Only data needs the fsync below: the metadata of the staged file
                // reaches the journal with the rename that publishes it (the kernel
                // overlay syncs only when it copied data, too).
                let copied_data = data == CopyData::Yes && size > 0;
                self.copy_metadata(
                    inode,
                    Target::Open(src.as_fd()),
                    Target::Open(dst.as_fd()),
                    &st,
                    true,
                )?;
                sys::fs::futimens(dst.as_fd(), times.0, times.1)?;
                if self.opts.syncs && copied_data {
                    sys::fs::fsync(&dst, false)?;
                }
                return Ok(flags);
            }
            libc::S_IFDIR => {
                let dst = make_dir_copy(work, temp)?;
                self.copy_metadata(
                    inode,
                    Target::Entry(src_dir, name),
                    Target::Fd(dst.as_fd()),
                    &st,
                    true,
                )?;
                // A directory reached through a redirect keeps it: its lower
                // content is still there, not at its name.
                if let Some(path) = inode.state.read().redirect().map(Box::<OsStr>::from) {
                    self.set_redirect(dst.as_fd(), &path)?;
                }
                sys::fs::utimens_at(work, temp, times.0, times.1)?;
            }
            libc::S_IFLNK => {
                let target = sys::fs::readlink_at(src_dir, name)?;
                sys::fs::symlink_at(&target, work, temp)?;
                self.copy_metadata(
                    inode,
                    Target::Entry(src_dir, name),
                    Target::Entry(work, temp),
                    &st,
                    false,
                )?;
                sys::fs::utimens_at(work, temp, times.0, times.1)?;
            }
            kind => {
                sys::fs::mknod_at(work, temp, kind | mode, st.st_rdev)?;
                self.copy_metadata(
                    inode,
                    Target::Entry(src_dir, name),
                    Target::Entry(work, temp),
                    &st,
                    true,
                )?;
                sys::fs::utimens_at(work, temp, times.0, times.1)?;
            }
        }
        Ok(0)
    }
}

impl Union {
    /// Makes the regular file `dir/name` (which must not exist), private to its
    /// owner (0600) until the caller gives it its metadata, with the data of `from`
    /// (`size` bytes) as `data` says. Every copy of a file makes it so: a copy-up
    /// staged in the work directory, a volume filled from the merged view.
    pub(crate) fn make_file_copy(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        from: &File,
        size: u64,
        data: CopyData,
    ) -> Result<File> {
        let dst = sys::fs::open_at(
            dir,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
            0o600,
        )?;
        match data {
            CopyData::Yes => self.copy_data(from, &dst, size)?,
            CopyData::No => {}
            CopyData::Meta => self.stage_metacopy(&dst, size)?,
        }
        Ok(dst)
    }
}

/// Makes the directory `dir/name` (which must not exist), private to its owner
/// (0700) until the caller gives it its metadata, and opens it for what is copied
/// into it (as [`Union::make_file_copy`] for files).
pub(crate) fn make_dir_copy(dir: BorrowedFd<'_>, name: &OsStr) -> sys::SysResult<OwnedFd> {
    sys::fs::mkdir_at(dir, name, 0o700)?;
    sys::fs::open_dir(dir, name)
}

/// Files up to this size are copied in one range: looking for holes in them costs
/// more syscalls than the few blocks a hole could save.
const DENSE_COPY_MAX: u64 = 64 << 10;

impl Union {
    /// Copies every data extent of `src` into `dst` and sets its size; holes stay
    /// holes. A reflink is tried until the upper filesystem has refused one.
    pub(crate) fn copy_data(&self, src: &File, dst: &File, size: u64) -> Result<()> {
        if size > 0 && self.reflink.load(std::sync::atomic::Ordering::Relaxed) {
            match sys::fs::clone_file(dst, src) {
                Ok(()) => return Ok(()),
                Err(Errno::OPNOTSUPP | Errno::XDEV | Errno::INVAL | Errno::NOTTY) => {
                    self.reflink
                        .store(false, std::sync::atomic::Ordering::Relaxed);
                }
                Err(_) => {}
            }
        }
        if size <= DENSE_COPY_MAX {
            return match copy_range(src, dst, 0, size)? {
                reached if reached == size => Ok(()),
                _ => Ok(sys::fs::ftruncate(dst, size)?),
            };
        }
        Ok(copy_extents(src, dst, size)?)
    }
}

/// [`Union::copy_data`] for a file that may have holes.
fn copy_extents(src: &File, dst: &File, size: u64) -> sys::SysResult<()> {
    let mut offset = 0u64;
    while offset < size {
        let start = match sys::fs::lseek(src, offset as i64, libc::SEEK_DATA) {
            Ok(pos) => pos,
            Err(Errno::NXIO) => break,
            // No SEEK_DATA support: treat the rest as data.
            Err(Errno::INVAL) | Err(Errno::OPNOTSUPP) => offset,
            Err(e) => return Err(e),
        };
        if start >= size {
            break;
        }
        let end = match sys::fs::lseek(src, start as i64, libc::SEEK_HOLE) {
            Ok(pos) => pos.min(size),
            Err(_) => size,
        };
        copy_range(src, dst, start, end)?;
        offset = end;
    }
    sys::fs::ftruncate(dst, size)
}

/// Copies bytes [start, end) at the same offsets, in kernel where possible; returns
/// the offset reached (short of `end` when the source shrank under us).
fn copy_range(src: &File, dst: &File, start: u64, end: u64) -> sys::SysResult<u64> {
    let mut pos = start;
    while pos < end {
        let len = (end - pos).min(1 << 30) as usize;
        match sys::fs::copy_file_range(src, pos, dst, pos, len) {
            Ok(0) => break, // the source shrank under us
            Ok(n) => pos += n as u64,
            Err(Errno::XDEV) | Err(Errno::INVAL) | Err(Errno::NOSYS) | Err(Errno::OPNOTSUPP) => {
                return copy_range_by_hand(src, dst, pos, end);
            }
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(pos)
}

fn copy_range_by_hand(src: &File, dst: &File, mut pos: u64, end: u64) -> sys::SysResult<u64> {
    let mut buf = vec![0u8; 1 << 20];
    while pos < end {
        let want = ((end - pos) as usize).min(buf.len());
        let n = sys::fs::pread(src, &mut buf[..want], pos)?;
        if n == 0 {
            break;
        }
        let mut done = 0;
        while done < n {
            done += sys::fs::pwrite(dst, &buf[done..n], pos + done as u64)?;
        }
        pos += n as u64;
    }
    Ok(pos)
}

/// Copies user-visible xattrs. Private overlay xattrs stay behind: they describe the
/// source's place in its layer, not the file. Attributes the upper filesystem
/// refuses (e.g. security.* on a filesystem without them) are skipped with a log line.
pub(crate) fn copy_xattrs(src: Target<'_>, dst: Target<'_>) -> sys::SysResult<()> {
    let names = match sys::xattr::list(src) {
        Ok(n) => n,
        Err(Errno::OPNOTSUPP) => return Ok(()),
        Err(e) => return Err(e),
    };
    for name in names {
        // Override xattrs are the file's owner and mode: they travel with it.
        if is_private_xattr(&name) && !override_stat::is_override_name(name.as_encoded_bytes()) {
            continue;
        }
        let value = match sys::xattr::get(src, &name) {
            Ok(v) => v,
            Err(Errno::NODATA) => continue,
            Err(e) => return Err(e),
        };
        match sys::xattr::set(dst, &name, &value, 0) {
            Ok(()) => {}
            Err(e @ (Errno::OPNOTSUPP | Errno::PERM | Errno::ACCESS)) => {
                log::warn!("copy-up: xattr {name:?} not copied: {e}");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
