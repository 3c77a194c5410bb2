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
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use rustix::fs::OFlags;

use super::inode::{Inode, LayerRef};
use super::whiteout::is_private_xattr;
use super::{Errno, Result, UPPER, Union};
use crate::sys::{self, fs::RenameKind, fs::TimeSpec, xattr::Target};

/// Whether a copy-up must carry the file's data (a truncate to zero need not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CopyData {
    Yes,
    No,
}

impl Union {
    pub(crate) fn is_in_upper(&self, inode: &Inode) -> bool {
        if let Some(in_place) = self.graft_in_place(inode) {
            return in_place;
        }
        self.upper && inode.state.read().top_layer() == Some(UPPER)
    }

    /// Ensures `inode` (and its parents) exist in the upper layer.
    pub(crate) fn copy_up(&self, inode: &Inode, data: CopyData) -> Result<()> {
        self.check_writable()?;
        if let Some(r) = self.graft_copy_up(inode) {
            return r;
        }
        if self.is_in_upper(inode) {
            return Ok(());
        }
        let _guard = inode.copy_up.lock();
        if self.is_in_upper(inode) {
            return Ok(());
        }
        let (parent_ino, name, src_layer) = {
            let st = inode.state.read();
            if st.detached {
                return Err(Errno::NOENT);
            }
            (
                st.parent,
                st.name.clone(),
                st.top_layer().ok_or(Errno::STALE)?,
            )
        };
        let parent = self.inode(parent_ino)?;
        self.copy_up(&parent, CopyData::Yes)?;
        let src_dir = self.dir_fd(&parent, src_layer)?;
        let dst_dir = self.dir_fd(&parent, UPPER)?;
        let work = self.work_fd()?.clone();
        let temp = self.temp_name();
        let staged = self.stage_copy(inode, src_dir.as_fd(), &name, work.as_fd(), &temp, data);
        if let Err(e) = staged {
            let _ = super::remove_tree(work.as_fd(), &temp);
            return Err(e);
        }
        if let Err(e) = sys::fs::rename_at(
            work.as_fd(),
            &temp,
            dst_dir.as_fd(),
            &name,
            RenameKind::NoReplace,
        ) {
            let _ = super::remove_tree(work.as_fd(), &temp);
            return Err(e);
        }
        let upper_stat = sys::fs::stat_at(dst_dir.as_fd(), &name)?;
        {
            let mut st = inode.state.write();
            if inode.is_dir() {
                let fd = sys::fs::open_dir(dst_dir.as_fd(), &name)?;
                st.layers.insert(
                    0,
                    LayerRef {
                        layer: UPPER,
                        fd: Some(Arc::new(fd)),
                    },
                );
                self.inodes
                    .dir_fds
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            } else {
                st.layers = vec![LayerRef {
                    layer: UPPER,
                    fd: None,
                }];
            }
        }
        self.inodes
            .add_identity(inode, (upper_stat.st_dev, upper_stat.st_ino));
        if inode.is_dir() {
            self.attrs_changed(inode.ino);
        }
        Ok(())
    }

    /// Builds the copy of `src_dir/name` as `work/temp`, metadata included.
    fn stage_copy(
        &self,
        inode: &Inode,
        src_dir: BorrowedFd<'_>,
        name: &OsStr,
        work: BorrowedFd<'_>,
        temp: &OsStr,
        data: CopyData,
    ) -> Result<()> {
        let st = sys::fs::stat_at(src_dir, name)?;
        if st.st_mode & libc::S_IFMT != inode.kind {
            return Err(Errno::STALE);
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
                let src = sys::fs::open_at(src_dir, name, OFlags::RDONLY, 0)?;
                let dst = sys::fs::open_at(
                    work,
                    temp,
                    OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
                    0o600,
                )?;
                if data == CopyData::Yes {
                    copy_data(&src, &dst, st.st_size as u64)?;
                }
                sys::fs::fchown(dst.as_fd(), Some(st.st_uid), Some(st.st_gid))?;
                sys::fs::chmod_fd(dst.as_fd(), mode)?;
                copy_xattrs(Target::Entry(src_dir, name), Target::Fd(dst.as_fd()))?;
                sys::fs::futimens(dst.as_fd(), times.0, times.1)?;
                if self.opts.syncs {
                    sys::fs::fsync(&dst, false)?;
                }
            }
            libc::S_IFDIR => {
                sys::fs::mkdir_at(work, temp, 0o700)?;
                let dst = sys::fs::open_dir(work, temp)?;
                sys::fs::fchown(dst.as_fd(), Some(st.st_uid), Some(st.st_gid))?;
                sys::fs::chmod_fd(dst.as_fd(), mode)?;
                copy_xattrs(Target::Entry(src_dir, name), Target::Fd(dst.as_fd()))?;
                sys::fs::utimens_at(work, temp, times.0, times.1)?;
            }
            libc::S_IFLNK => {
                let target = sys::fs::readlink_at(src_dir, name)?;
                sys::fs::symlink_at(&target, work, temp)?;
                sys::fs::chown_at(work, temp, Some(st.st_uid), Some(st.st_gid))?;
                copy_xattrs(Target::Entry(src_dir, name), Target::Entry(work, temp))?;
                sys::fs::utimens_at(work, temp, times.0, times.1)?;
            }
            kind => {
                sys::fs::mknod_at(work, temp, kind | mode, st.st_rdev)?;
                sys::fs::chown_at(work, temp, Some(st.st_uid), Some(st.st_gid))?;
                sys::fs::chmod_at(work, temp, mode)?;
                copy_xattrs(Target::Entry(src_dir, name), Target::Entry(work, temp))?;
                sys::fs::utimens_at(work, temp, times.0, times.1)?;
            }
        }
        Ok(())
    }
}

/// Copies every data extent of `src` into `dst` and sets its size; holes stay holes.
pub(crate) fn copy_data(src: &File, dst: &File, size: u64) -> Result<()> {
    if size > 0 && sys::fs::clone_file(dst, src).is_ok() {
        return Ok(());
    }
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

/// Copies bytes [start, end) at the same offsets, in kernel where possible.
fn copy_range(src: &File, dst: &File, start: u64, end: u64) -> Result<()> {
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
    Ok(())
}

fn copy_range_by_hand(src: &File, dst: &File, mut pos: u64, end: u64) -> Result<()> {
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
    Ok(())
}

/// Copies user-visible xattrs. Private overlay xattrs stay behind: they describe the
/// source's place in its layer, not the file. Attributes the upper filesystem
/// refuses (e.g. security.* on a filesystem without them) are skipped with a log line.
pub(crate) fn copy_xattrs(src: Target<'_>, dst: Target<'_>) -> Result<()> {
    let names = match sys::xattr::list(src) {
        Ok(n) => n,
        Err(Errno::OPNOTSUPP) => return Ok(()),
        Err(e) => return Err(e),
    };
    for name in names {
        if is_private_xattr(&name) {
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
