//! Inode flags (chattr/lsattr: FS_IOC_GETFLAGS/SETFLAGS, FS_IOC_FSGETXATTR/SETXATTR).
//!
//! The flags live on the real file an entry stands for now: reading them reads its
//! current layer file, setting them copies a lower entry up first (as kernel
//! overlayfs does) and sets them on the upper copy.
//!
//! Enforcement (the kernel's FUSE client keeps no inode flags, so it checks none):
//! - An upper file's append-only/immutable flags are real flags, so the upper
//!   filesystem refuses the daemon's own writes, truncations, renames, removals and
//!   metadata changes with EPERM.
//! - A lower file's are checked before the copy-up or whiteout a change would make:
//!   the copy would be writable, and kernel overlayfs refuses those changes at its
//!   own inode. Only appending opens of an append-only file and flag changes get
//!   through, and their copy-up carries the flags.
//! - A directory's append-only/immutable flags are not carried by a copy-up: on the
//!   upper directory they would refuse the copy-up of its children (kernel overlayfs
//!   keeps them in an xattr of its own for that reason).

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd};

use rustix::fs::{IFlags, OFlags};

use super::copy_up::CopyData;
use super::inode::Inode;
use super::{Errno, Ino, Result, Union};
use crate::sys::{self, fs::FSXATTR_SIZE};

/// The flags that refuse changes (FS_APPEND_FL | FS_IMMUTABLE_FL).
const PROTECTED: u32 = IFlags::APPEND.bits() | IFlags::IMMUTABLE.bits();

/// The flags a copy-up of a regular file carries to the upper copy.
const CARRIED: u32 =
    PROTECTED | IFlags::SYNC.bits() | IFlags::NOATIME.bits() | IFlags::NODUMP.bits();

/// Why a lower entry is about to be copied up or hidden, for the flags check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    /// Data, size, metadata, name or existence: refused by either flag.
    Modify,
    /// An open with O_APPEND and without O_TRUNC: refused by immutable only.
    Append,
    /// A flag change (chattr): always allowed, the kernel checked the caller.
    Flags,
}

/// Flags of a layer filesystem without inode flags read as none.
/// The inode flags of an open regular file or directory; none where the filesystem
/// keeps no such flags.
pub(crate) fn flags_of(fd: BorrowedFd<'_>) -> sys::SysResult<u32> {
    flags_or_none(sys::fs::inode_flags(fd))
}

fn flags_or_none(r: sys::SysResult<u32>) -> sys::SysResult<u32> {
    match r {
        Err(Errno::NOTTY | Errno::INVAL | Errno::OPNOTSUPP | Errno::NOSYS) => Ok(0),
        other => other,
    }
}

fn refuses(flags: u32, change: Change) -> bool {
    match change {
        Change::Modify => flags & PROTECTED != 0,
        Change::Append => flags & IFlags::IMMUTABLE.bits() != 0,
        Change::Flags => false,
    }
}

impl Union {
    /// FS_IOC_GETFLAGS of `ino`'s current layer file.
    pub fn inode_flags(&self, ino: Ino) -> Result<u32> {
        let inode = self.inode(ino)?;
        self.with_real_fd(&inode, sys::fs::inode_flags)
    }

    /// FS_IOC_SETFLAGS on `ino`: the entry is copied up first. The kernel has checked
    /// the caller (owner, CAP_LINUX_IMMUTABLE for append-only and immutable) before
    /// asking; the upper filesystem checks the daemon.
    pub fn set_inode_flags(&self, ino: Ino, flags: u32) -> Result<()> {
        let inode = self.inode(ino)?;
        self.copy_up_for(&inode, CopyData::Yes, Change::Flags)?;
        self.with_real_fd(&inode, |fd| sys::fs::set_inode_flags(fd, flags))?;
        self.attrs_changed(ino);
        Ok(())
    }

    /// FS_IOC_FSGETXATTR of `ino`'s current layer file.
    pub fn fs_xattr(&self, ino: Ino) -> Result<[u8; FSXATTR_SIZE]> {
        let inode = self.inode(ino)?;
        self.with_real_fd(&inode, sys::fs::fs_xattr)
    }

    /// FS_IOC_FSSETXATTR on `ino`, copied up first as for [`Union::set_inode_flags`].
    pub fn set_fs_xattr(&self, ino: Ino, value: &[u8; FSXATTR_SIZE]) -> Result<()> {
        let inode = self.inode(ino)?;
        self.copy_up_for(&inode, CopyData::Yes, Change::Flags)?;
        self.with_real_fd(&inode, |fd| sys::fs::set_fs_xattr(fd, value))?;
        self.attrs_changed(ino);
        Ok(())
    }

    /// Runs `f` on a real (not O_PATH) descriptor of the regular file or directory
    /// `inode` stands for now; ENOTTY for anything else (as the kernel answers).
    fn with_real_fd<T>(
        &self,
        inode: &Inode,
        f: impl FnOnce(BorrowedFd<'_>) -> sys::SysResult<T>,
    ) -> Result<T> {
        if inode.is_dir() {
            let top = inode.state.read().top_layer().ok_or(Errno::STALE)?;
            let dir = self.dir_fd(inode, top)?;
            let fd = sys::fs::open_dir_for_listing(dir.as_fd())?;
            return Ok(f(fd.as_fd())?);
        }
        if inode.kind != libc::S_IFREG {
            return Err(Errno::NOTTY.into());
        }
        // Opening moves no atime, so no O_NOATIME (which needs ownership).
        let file = self.open_entry(inode, OFlags::RDONLY)?;
        Ok(f(file.as_fd())?)
    }

    /// EPERM when `inode` is a lower regular file whose append-only or immutable
    /// flag refuses `change` (checked before its copy-up).
    pub(crate) fn refuse_protected(&self, inode: &Inode, change: Change) -> Result<()> {
        if change == Change::Flags || inode.kind != libc::S_IFREG || self.has_upper_data(inode) {
            return Ok(());
        }
        let (pfd, name, _) = self.entry_loc(inode)?;
        self.refuse_protected_at(pfd.as_fd(), &name, change)
    }

    /// The same for the regular file `dir/name` of a lower layer.
    pub(crate) fn refuse_protected_at(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        change: Change,
    ) -> Result<()> {
        // statx where the layer reports the two flags there: one call instead of an
        // open, an ioctl and a close for every removal of a lower file.
        let flags = match sys::fs::protection_flags_at(dir, name)? {
            Some(flags) => flags,
            None => self.lower_flags_at(dir, name)?,
        };
        if refuses(flags, change) {
            log::debug!(
                "{:?}: the lower file is {}, refusing the change",
                name,
                if flags & IFlags::IMMUTABLE.bits() != 0 {
                    "immutable"
                } else {
                    "append-only"
                }
            );
            return Err(Errno::PERM.into());
        }
        Ok(())
    }

    /// The flags of the regular file `dir/name`; none for a file a layer holds
    /// without inode flags, or one the daemon may not open (a rootless daemon and
    /// another user's unreadable file: its changes are refused by the checks that
    /// follow, or made without reading it, as before).
    pub(crate) fn lower_flags_at(&self, dir: BorrowedFd<'_>, name: &OsStr) -> Result<u32> {
        // Opening moves no atime, so no O_NOATIME (which needs ownership).
        let file = match sys::fs::open_regular_at(dir, name, OFlags::RDONLY) {
            Ok((file, _)) => file,
            Err(Errno::ACCESS) => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        Ok(flags_of(file.as_fd())?)
    }

    /// After the copy-up of a regular file whose source had `flags`: gives the upper
    /// copy the ones a copy-up keeps. Set last, once the copy is in place (an
    /// immutable file could not be renamed into it). A failure is logged, not
    /// answered: the copy itself is complete.
    pub(crate) fn carry_flags(&self, inode: &Inode, flags: u32) {
        let keep = flags & CARRIED;
        if keep == 0 {
            return;
        }
        let set = self.with_real_fd(inode, |fd| {
            let now = flags_or_none(sys::fs::inode_flags(fd))?;
            sys::fs::set_inode_flags(fd, now | keep)
        });
        if let Err(e) = set {
            log::warn!(
                "copy-up of inode {}: keeping its inode flags {keep:#x}: {e}",
                inode.ino
            );
        }
    }
}
