//! Directory-fd-relative file operations on layer entries. See the module invariants in
//! `sys/mod.rs`: one component per call, the final component never followed.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use rustix::fs::{AtFlags, Dev, FileType, Mode, OFlags, RenameFlags, Timespec, Timestamps};

pub use rustix::fs::{Stat, StatFs};

use super::{Errno, SysResult};

/// Refuses anything that is not exactly one path component: the one check for names
/// the kernel sends (before the engine uses them) and for every name a call here is
/// given. Length is judged first, as the kernel's path walk does, so an over-long
/// name is ENAMETOOLONG whatever else is wrong with it.
pub fn check_component(name: &OsStr) -> SysResult<()> {
    let bytes = name.as_bytes();
    if bytes.len() > 255 {
        return Err(Errno::NAMETOOLONG);
    }
    if bytes.is_empty()
        || bytes == b"."
        || bytes == b".."
        || bytes.contains(&b'/')
        || bytes.contains(&0)
    {
        return Err(Errno::INVAL);
    }
    Ok(())
}

/// The path through which the kernel reaches the object an fd refers to. Used where a
/// syscall has no fd-relative form; the magic link resolves to exactly that inode.
pub fn proc_fd_path(fd: BorrowedFd<'_>) -> CString {
    // A decimal number has no interior NUL.
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
}

/// Opens a configured layer root. The path comes from the (validated) mount
/// configuration and is allowed to be reached through symlinks.
pub fn open_root(path: &Path) -> SysResult<OwnedFd> {
    rustix::fs::open(
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Opens a lower layer's root as a private, detached copy of its own mount
/// (`open_tree` with OPEN_TREE_CLONE, not recursive): lookups through it stay on
/// the layer's filesystem and see the directories under any mount point inside it,
/// as kernel overlayfs does, and nothing mounted in the layer later changes the
/// view. Where the process may not clone mounts (unprivileged outside its own mount
/// namespace, or a layer with locked mounts inside) the plain directory is opened,
/// and `false` says so.
pub fn open_layer_root(path: &Path) -> SysResult<(OwnedFd, bool)> {
    use rustix::mount::{OpenTreeFlags, open_tree};
    match open_tree(
        rustix::fs::CWD,
        path,
        OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
    ) {
        Ok(fd) => Ok((fd, true)),
        Err(_) => Ok((open_root(path)?, false)),
    }
}

/// An O_PATH handle on a subdirectory; fails with ENOTDIR/ELOOP if `name` is not a
/// real directory (a symlink to one does not count).
pub fn open_dir(dirfd: BorrowedFd<'_>, name: &OsStr) -> SysResult<OwnedFd> {
    check_component(name)?;
    rustix::fs::openat(
        dirfd,
        name,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Opens an entry for I/O. O_NOFOLLOW is always added; O_CREAT gets O_EXCL semantics
/// only when the caller asks.
pub fn open_at(dirfd: BorrowedFd<'_>, name: &OsStr, flags: OFlags, mode: u32) -> SysResult<File> {
    check_component(name)?;
    let fd = rustix::fs::openat(
        dirfd,
        name,
        flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode),
    )?;
    Ok(File::from(fd))
}

/// Opens, by name, an entry that was looked up as a regular file, for I/O; returns
/// it with its fstat. A layer may have changed since the lookup: whatever is at the
/// name now is opened with O_NONBLOCK (a FIFO would otherwise park the calling
/// worker until a writer comes), O_NOCTTY (a terminal must not become the daemon's)
/// and O_NOFOLLOW, and anything but a regular file answers ESTALE (the kernel then
/// looks the name up again). O_NONBLOCK is cleared again unless the caller asked for
/// it, so that a regular file's descriptor behaves as opened.
pub fn open_regular_at(
    dirfd: BorrowedFd<'_>,
    name: &OsStr,
    flags: OFlags,
) -> SysResult<(File, Stat)> {
    check_component(name)?;
    let extra = OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = match rustix::fs::openat(dirfd, name, flags | extra, Mode::empty()) {
        // A symlink (O_NOFOLLOW), a FIFO without reader or a socket (ENXIO), a
        // directory opened for writing: not the file that was looked up.
        Err(Errno::LOOP | Errno::NXIO | Errno::ISDIR) => return Err(Errno::STALE),
        other => other?,
    };
    let st = rustix::fs::fstat(&fd)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(Errno::STALE);
    }
    if !flags.contains(OFlags::NONBLOCK) {
        // F_SETFL takes only the status flags from its argument (O_APPEND, O_NONBLOCK,
        // O_NOATIME, O_DIRECT, O_ASYNC) and ignores the rest, so the caller's flags
        // are exactly what the descriptor keeps: no F_GETFL needed.
        rustix::fs::fcntl_setfl(&fd, flags)?;
    }
    Ok((File::from(fd), st))
}

/// Opens a directory (given by an O_PATH handle) for reading its entries.
pub fn open_dir_for_listing(dir: BorrowedFd<'_>) -> SysResult<OwnedFd> {
    rustix::fs::openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Re-opens the object behind an O_PATH handle with real access flags.
pub fn reopen(fd: BorrowedFd<'_>, flags: OFlags) -> SysResult<File> {
    let path = proc_fd_path(fd);
    let fd = rustix::fs::open(
        path.as_c_str(),
        (flags | OFlags::CLOEXEC) & !(OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW),
        Mode::empty(),
    )?;
    Ok(File::from(fd))
}

pub fn stat_at(dirfd: BorrowedFd<'_>, name: &OsStr) -> SysResult<Stat> {
    check_component(name)?;
    rustix::fs::statat(dirfd, name, AtFlags::SYMLINK_NOFOLLOW)
}

pub fn fstat(fd: BorrowedFd<'_>) -> SysResult<Stat> {
    rustix::fs::fstat(fd)
}

pub fn fstatfs(fd: BorrowedFd<'_>) -> SysResult<StatFs> {
    rustix::fs::fstatfs(fd)
}

pub fn mkdir_at(dirfd: BorrowedFd<'_>, name: &OsStr, mode: u32) -> SysResult<()> {
    check_component(name)?;
    rustix::fs::mkdirat(dirfd, name, Mode::from_raw_mode(mode))
}

/// mknod of any non-directory, non-regular type. `mode` carries the S_IFMT bits.
pub fn mknod_at(dirfd: BorrowedFd<'_>, name: &OsStr, mode: u32, rdev: u64) -> SysResult<()> {
    check_component(name)?;
    let kind = FileType::from_raw_mode(mode);
    rustix::fs::mknodat(
        dirfd,
        name,
        kind,
        Mode::from_raw_mode(mode & 0o7777),
        rdev as Dev,
    )
}

pub fn symlink_at(target: &OsStr, dirfd: BorrowedFd<'_>, name: &OsStr) -> SysResult<()> {
    check_component(name)?;
    if target.is_empty() || target.as_bytes().contains(&0) {
        return Err(Errno::NOENT);
    }
    rustix::fs::symlinkat(target, dirfd, name)
}

pub fn readlink_at(dirfd: BorrowedFd<'_>, name: &OsStr) -> SysResult<OsString> {
    check_component(name)?;
    let target = rustix::fs::readlinkat(dirfd, name, Vec::new())?;
    Ok(OsString::from_vec(target.into_bytes()))
}

pub fn link_at(
    old_dir: BorrowedFd<'_>,
    old_name: &OsStr,
    new_dir: BorrowedFd<'_>,
    new_name: &OsStr,
) -> SysResult<()> {
    check_component(old_name)?;
    check_component(new_name)?;
    rustix::fs::linkat(old_dir, old_name, new_dir, new_name, AtFlags::empty())
}

/// Gives the object behind `fd` (an O_PATH handle) the name `new_dir/new_name`:
/// linkat through its /proc/self/fd entry, which needs no capability (AT_EMPTY_PATH
/// needs CAP_DAC_READ_SEARCH). ENOENT when the object has no links left.
pub fn link_fd(fd: BorrowedFd<'_>, new_dir: BorrowedFd<'_>, new_name: &OsStr) -> SysResult<()> {
    check_component(new_name)?;
    let path = proc_fd_path(fd);
    rustix::fs::linkat(
        rustix::fs::CWD,
        path.as_c_str(),
        new_dir,
        new_name,
        AtFlags::SYMLINK_FOLLOW,
    )
}

pub fn unlink_at(dirfd: BorrowedFd<'_>, name: &OsStr) -> SysResult<()> {
    check_component(name)?;
    rustix::fs::unlinkat(dirfd, name, AtFlags::empty())
}

pub fn rmdir_at(dirfd: BorrowedFd<'_>, name: &OsStr) -> SysResult<()> {
    check_component(name)?;
    rustix::fs::unlinkat(dirfd, name, AtFlags::REMOVEDIR)
}

/// How `rename_at` treats the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenameKind {
    Replace,
    NoReplace,
    Exchange,
    /// Leave a whiteout (char 0/0) at the source; needs CAP_MKNOD.
    Whiteout,
}

pub fn rename_at(
    old_dir: BorrowedFd<'_>,
    old_name: &OsStr,
    new_dir: BorrowedFd<'_>,
    new_name: &OsStr,
    kind: RenameKind,
) -> SysResult<()> {
    check_component(old_name)?;
    check_component(new_name)?;
    let flags = match kind {
        RenameKind::Replace => RenameFlags::empty(),
        RenameKind::NoReplace => RenameFlags::NOREPLACE,
        RenameKind::Exchange => RenameFlags::EXCHANGE,
        RenameKind::Whiteout => RenameFlags::WHITEOUT,
    };
    rustix::fs::renameat_with(old_dir, old_name, new_dir, new_name, flags)
}

/// chmod without following a final symlink (a symlink answers EOPNOTSUPP): one
/// fchmodat2 where the kernel has it; before Linux 6.6 the entry is pinned with
/// O_PATH|O_NOFOLLOW, checked not to be a symlink, and changed through its /proc
/// magic link (which names exactly that inode).
pub fn chmod_at(dirfd: BorrowedFd<'_>, name: &OsStr, mode: u32) -> SysResult<()> {
    check_component(name)?;
    if super::at_calls::has_fchmodat2() {
        return super::at_calls::fchmodat2(dirfd, name, mode);
    }
    let fd = rustix::fs::openat(
        dirfd,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    chmod_fd(fd.as_fd(), mode)
}

/// chmod of the object behind any fd, O_PATH included; refuses symlinks.
pub fn chmod_fd(fd: BorrowedFd<'_>, mode: u32) -> SysResult<()> {
    // fchmodat2 on the fd itself takes any fd, O_PATH included.
    if super::at_calls::has_fchmodat2() {
        return super::at_calls::fchmodat2(fd, OsStr::new(""), mode);
    }
    // An fd open for I/O takes fchmod (and is never a symlink); O_PATH answers EBADF.
    match rustix::fs::fchmod(fd, Mode::from_raw_mode(mode & 0o7777)) {
        Err(Errno::BADF) => {}
        other => return other,
    }
    let st = rustix::fs::fstat(fd)?;
    if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
        return Err(Errno::OPNOTSUPP);
    }
    let path = proc_fd_path(fd);
    rustix::fs::chmod(path.as_c_str(), Mode::from_raw_mode(mode & 0o7777))
}

pub fn chown_at(
    dirfd: BorrowedFd<'_>,
    name: &OsStr,
    uid: Option<u32>,
    gid: Option<u32>,
) -> SysResult<()> {
    check_component(name)?;
    rustix::fs::chownat(
        dirfd,
        name,
        uid.map(rustix::fs::Uid::from_raw),
        gid.map(rustix::fs::Gid::from_raw),
        AtFlags::SYMLINK_NOFOLLOW,
    )
}

pub fn fchown(fd: BorrowedFd<'_>, uid: Option<u32>, gid: Option<u32>) -> SysResult<()> {
    rustix::fs::chownat(
        fd,
        "",
        uid.map(rustix::fs::Uid::from_raw),
        gid.map(rustix::fs::Gid::from_raw),
        AtFlags::EMPTY_PATH,
    )
}

/// A timestamp for `utimens_at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeSpec {
    Omit,
    Now,
    At { sec: i64, nsec: u32 },
}

fn timespec(t: TimeSpec) -> Timespec {
    match t {
        TimeSpec::Omit => Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
        TimeSpec::Now => Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_NOW,
        },
        TimeSpec::At { sec, nsec } => Timespec {
            tv_sec: sec,
            tv_nsec: nsec.into(),
        },
    }
}

pub fn utimens_at(
    dirfd: BorrowedFd<'_>,
    name: &OsStr,
    atime: TimeSpec,
    mtime: TimeSpec,
) -> SysResult<()> {
    check_component(name)?;
    let times = Timestamps {
        last_access: timespec(atime),
        last_modification: timespec(mtime),
    };
    rustix::fs::utimensat(dirfd, name, &times, AtFlags::SYMLINK_NOFOLLOW)
}

/// utimens of the object behind any fd, O_PATH included (futimens refuses those).
pub fn utimens_fd(fd: BorrowedFd<'_>, atime: TimeSpec, mtime: TimeSpec) -> SysResult<()> {
    let times = Timestamps {
        last_access: timespec(atime),
        last_modification: timespec(mtime),
    };
    let path = proc_fd_path(fd);
    rustix::fs::utimensat(rustix::fs::CWD, path.as_c_str(), &times, AtFlags::empty())
}

pub fn futimens(fd: BorrowedFd<'_>, atime: TimeSpec, mtime: TimeSpec) -> SysResult<()> {
    let times = Timestamps {
        last_access: timespec(atime),
        last_modification: timespec(mtime),
    };
    rustix::fs::futimens(fd, &times)
}

/// One raw directory entry as the layer stores it.
#[derive(Debug, Clone)]
pub struct RawEntry {
    pub name: OsString,
    pub ino: u64,
    /// `S_IF*` bits from d_type; 0 when the filesystem does not report it.
    pub kind: u32,
}

/// Reads every entry of a directory (given by an O_PATH handle), `.`/`..` excluded.
pub fn read_dir(dir: BorrowedFd<'_>) -> SysResult<Vec<RawEntry>> {
    let fd = open_dir_for_listing(dir)?;
    let mut out = Vec::new();
    let mut buf = Vec::with_capacity(32 * 1024);
    let mut iter = rustix::fs::RawDir::new(&fd, buf.spare_capacity_mut());
    while let Some(entry) = iter.next() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        out.push(RawEntry {
            name: OsString::from_vec(name.to_vec()),
            ino: entry.ino(),
            kind: file_type_bits(entry.file_type()),
        });
    }
    Ok(out)
}

fn file_type_bits(kind: FileType) -> u32 {
    match kind {
        FileType::RegularFile => libc::S_IFREG,
        FileType::Directory => libc::S_IFDIR,
        FileType::Symlink => libc::S_IFLNK,
        FileType::Fifo => libc::S_IFIFO,
        FileType::Socket => libc::S_IFSOCK,
        FileType::CharacterDevice => libc::S_IFCHR,
        FileType::BlockDevice => libc::S_IFBLK,
        FileType::Unknown => 0,
    }
}

pub fn pread(file: &File, buf: &mut [u8], offset: u64) -> SysResult<usize> {
    rustix::io::pread(file, buf, offset)
}

pub fn pwrite(file: &File, buf: &[u8], offset: u64) -> SysResult<usize> {
    rustix::io::pwrite(file, buf, offset)
}

pub fn fsync(file: &File, data_only: bool) -> SysResult<()> {
    if data_only {
        rustix::fs::fdatasync(file)
    } else {
        rustix::fs::fsync(file)
    }
}

pub fn ftruncate(file: &File, len: u64) -> SysResult<()> {
    rustix::fs::ftruncate(file, len)
}

pub fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> SysResult<()> {
    let flags = rustix::fs::FallocateFlags::from_bits_retain(mode as u32);
    rustix::fs::fallocate(file, flags, offset, len)
}

/// lseek for SEEK_SET/CUR/END/DATA/HOLE (`whence` as in lseek(2)).
pub fn lseek(file: &File, offset: i64, whence: i32) -> SysResult<u64> {
    use rustix::fs::SeekFrom;
    let pos = match whence {
        libc::SEEK_SET => SeekFrom::Start(u64::try_from(offset).map_err(|_| Errno::INVAL)?),
        libc::SEEK_CUR => SeekFrom::Current(offset),
        libc::SEEK_END => SeekFrom::End(offset),
        libc::SEEK_DATA => SeekFrom::Data(u64::try_from(offset).map_err(|_| Errno::NXIO)?),
        libc::SEEK_HOLE => SeekFrom::Hole(u64::try_from(offset).map_err(|_| Errno::NXIO)?),
        _ => return Err(Errno::INVAL),
    };
    rustix::fs::seek(file, pos)
}

pub fn copy_file_range(
    src: &File,
    src_off: u64,
    dst: &File,
    dst_off: u64,
    len: usize,
) -> SysResult<usize> {
    let mut src_off = src_off;
    let mut dst_off = dst_off;
    rustix::fs::copy_file_range(src, Some(&mut src_off), dst, Some(&mut dst_off), len)
}

/// Shares the source's extents with the destination (reflink); fails with
/// EOPNOTSUPP/EXDEV/EINVAL where the filesystem cannot.
pub fn clone_file(dst: &File, src: &File) -> SysResult<()> {
    rustix::fs::ioctl_ficlone(dst, src)
}

/// The inode flags of an open file or directory (FS_IOC_GETFLAGS, as lsattr reads
/// them). `fd` must be a real open, not O_PATH.
pub fn inode_flags(fd: BorrowedFd<'_>) -> SysResult<u32> {
    rustix::fs::ioctl_getflags(fd).map(|f| f.bits())
}

/// The append-only and immutable flags of the entry `dir/name` (not followed), as
/// FS_IOC_GETFLAGS bits, from statx: no open and no read access needed. None where
/// the filesystem does not report both in statx's attributes.
pub fn protection_flags_at(dir: BorrowedFd<'_>, name: &OsStr) -> SysResult<Option<u32>> {
    let stx = rustix::fs::statx(
        dir,
        name,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        rustix::fs::StatxFlags::TYPE,
    )?;
    use rustix::fs::{IFlags, StatxAttributes};
    let pairs = [
        (StatxAttributes::IMMUTABLE, IFlags::IMMUTABLE),
        (StatxAttributes::APPEND, IFlags::APPEND),
    ];
    let mut flags = 0;
    for (attr, flag) in pairs {
        if !stx.stx_attributes_mask.contains(attr) {
            return Ok(None);
        }
        if stx.stx_attributes.contains(attr) {
            flags |= flag.bits();
        }
    }
    Ok(Some(flags))
}

/// Sets the inode flags of an open file or directory (FS_IOC_SETFLAGS, as chattr
/// does). The layer filesystem checks the daemon's own privileges (append-only and
/// immutable need CAP_LINUX_IMMUTABLE) and answers EPERM without them.
pub fn set_inode_flags(fd: BorrowedFd<'_>, flags: u32) -> SysResult<()> {
    rustix::fs::ioctl_setflags(fd, rustix::fs::IFlags::from_bits_retain(flags))
}

/// `struct fsxattr` of linux/fs.h (FS_IOC_FSGETXATTR / FS_IOC_FSSETXATTR), as raw
/// bytes: stratafs only carries it between the kernel and a layer file.
pub const FSXATTR_SIZE: usize = 28;

/// `_IOR('X', 31, struct fsxattr)` and `_IOW('X', 32, struct fsxattr)`.
pub const FS_IOC_FSGETXATTR: u32 = 0x801c_581f;
pub const FS_IOC_FSSETXATTR: u32 = 0x401c_5820;

/// The extended attributes of FS_IOC_FSGETXATTR (xflags, extent size, project id).
pub fn fs_xattr(fd: BorrowedFd<'_>) -> SysResult<[u8; FSXATTR_SIZE]> {
    let mut buf = [0u8; FSXATTR_SIZE];
    // SAFETY: FS_IOC_FSGETXATTR writes exactly one struct fsxattr (28 bytes) to the
    // pointer, which points at a buffer of that size that outlives the call.
    let r = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            FS_IOC_FSGETXATTR as libc::Ioctl,
            buf.as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(Errno::from_raw_os_error(super::process::errno()));
    }
    Ok(buf)
}

/// Sets what FS_IOC_FSSETXATTR sets (see [`fs_xattr`]).
pub fn set_fs_xattr(fd: BorrowedFd<'_>, value: &[u8; FSXATTR_SIZE]) -> SysResult<()> {
    // SAFETY: FS_IOC_FSSETXATTR reads one struct fsxattr (28 bytes) from the pointer,
    // which points at a buffer of that size that outlives the call.
    let r = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            FS_IOC_FSSETXATTR as libc::Ioctl,
            value.as_ptr(),
        )
    };
    if r < 0 {
        return Err(Errno::from_raw_os_error(super::process::errno()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_component_refuses_what_is_not_one_name() {
        assert_eq!(check_component(OsStr::new("a.txt")), Ok(()));
        assert_eq!(check_component(OsStr::new(&"x".repeat(255))), Ok(()));
        for bad in ["", ".", "..", "a/b", "a\0b"] {
            assert_eq!(
                check_component(OsStr::new(bad)),
                Err(Errno::INVAL),
                "{bad:?}"
            );
        }
        // Length first, as the engine's check of kernel names always did.
        let long = format!("{}/", "x".repeat(300));
        assert_eq!(check_component(OsStr::new(&long)), Err(Errno::NAMETOOLONG));
    }
}
