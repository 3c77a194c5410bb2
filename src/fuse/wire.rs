//! The FUSE protocol as it crosses a FUSE-over-io_uring ring, which fuser cannot
//! carry: requests decoded into the arguments fuser's `Filesystem` callbacks
//! receive, replies encoded byte for byte as fuser 0.18 encodes them, so that the
//! ring and `/dev/fuse` answer alike.
//!
//! A ring request arrives in three pieces (fs/fuse/dev_uring.c,
//! fuse_uring_args_to_ring and fuse_uring_copy_to_ring): the `fuse_in_header`, the
//! op's first in-argument in the entry's 128-byte `op_in` area (nothing for the ops
//! whose first argument the kernel sets to zero size with `fuse_set_zero_arg0`), and
//! the payload, the remaining in-arguments back to back. A reply is the
//! `fuse_out_header` in the header area and every out-argument in the payload
//! (fs/fuse/dev.c, fuse_copy_out_args: with `is_uring` the header is not counted).
//!
//! Layouts are protocol minor 40 (what fuser 0.18 negotiates) with the init flags
//! the adapter asks for: no FUSE_SETXATTR_EXT, no security-context or
//! supplementary-group extensions. All of this is bytes in, bytes out: nothing here
//! may panic, whatever the kernel (or a bug in the ring code) hands it.

#![forbid(unsafe_code)]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, INodeNo, IoctlFlags,
    LockOwner, OpenFlags, RenameFlags, TimeOrNow, WriteFlags,
};

use crate::union::StatFs;

/// The opcodes decoded here (include/uapi/linux/fuse.h, enum fuse_opcode).
mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const REMOVEXATTR: u32 = 24;
    pub const FLUSH: u32 = 25;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const DESTROY: u32 = 38;
    pub const IOCTL: u32 = 39;
    pub const FALLOCATE: u32 = 43;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
    pub const LSEEK: u32 = 46;
    pub const COPY_FILE_RANGE: u32 = 47;
}

/// Sizes of the first in-arguments at minor 40 (include/uapi/linux/fuse.h).
mod size {
    pub const IN_HEADER: usize = 40;
    pub const FORGET_IN: usize = 8;
    pub const GETATTR_IN: usize = 16;
    pub const SETATTR_IN: usize = 88;
    pub const MKNOD_IN: usize = 16;
    pub const MKDIR_IN: usize = 8;
    pub const RENAME_IN: usize = 8;
    pub const RENAME2_IN: usize = 16;
    pub const LINK_IN: usize = 8;
    pub const OPEN_IN: usize = 8;
    pub const READ_IN: usize = 40;
    pub const WRITE_IN: usize = 40;
    pub const RELEASE_IN: usize = 24;
    pub const FSYNC_IN: usize = 16;
    /// FUSE_COMPAT_SETXATTR_IN_SIZE: without FUSE_SETXATTR_EXT the kernel sends only
    /// `size` and `flags` (fs/fuse/xattr.c, fuse_setxattr).
    pub const SETXATTR_IN: usize = 8;
    pub const GETXATTR_IN: usize = 8;
    pub const FLUSH_IN: usize = 24;
    pub const ACCESS_IN: usize = 8;
    pub const CREATE_IN: usize = 16;
    pub const IOCTL_IN: usize = 32;
    pub const FALLOCATE_IN: usize = 32;
    pub const LSEEK_IN: usize = 24;
    pub const COPY_FILE_RANGE_IN: usize = 56;
}

/// The answer to a request that does not parse. Not ENOSYS, which fuser gives:
/// the kernel takes ENOSYS from several ops (FLUSH, SETXATTR, LSEEK, ...) as "never
/// send this again" for the whole connection, and one garbled request must not
/// switch a feature off.
const MALFORMED: Errno = Errno::EIO;

fn bytes<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..at.checked_add(N)?)?.try_into().ok()
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    bytes(b, at).map(u16::from_ne_bytes)
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    bytes(b, at).map(u32::from_ne_bytes)
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    bytes(b, at).map(u64::from_ne_bytes)
}

/// The first `n` bytes of the op's first argument, or MALFORMED when `op_in` is
/// shorter: the kernel wrote exactly that struct there, and what follows it in the
/// 128-byte area is whatever an earlier request left.
fn arg0(op_in: &[u8], n: usize) -> Result<&[u8], Errno> {
    op_in.get(..n).ok_or(MALFORMED)
}

/// A NUL-terminated string at the start of `b` and what follows its NUL.
fn cstr(b: &[u8]) -> Result<(&OsStr, &[u8]), Errno> {
    let nul = b.iter().position(|&c| c == 0).ok_or(MALFORMED)?;
    let (name, rest) = (b.get(..nul), b.get(nul + 1..));
    Ok((
        OsStr::from_bytes(name.ok_or(MALFORMED)?),
        rest.ok_or(MALFORMED)?,
    ))
}

/// A field of an argument already cut to its struct's size: never `None`, but
/// answered MALFORMED rather than unwrapped, so no layout slip can panic.
fn field<T>(v: Option<T>) -> Result<T, Errno> {
    v.ok_or(MALFORMED)
}

/// fuser refuses offsets the kernel sent unsigned but libfuse would read as a
/// negative `off_t` (ll/request.rs, validate_off_t).
fn off_t(value: u64) -> Result<u64, Errno> {
    if value > i64::MAX as u64 {
        return Err(Errno::EINVAL);
    }
    Ok(value)
}

/// A request time as fuser makes it (time.rs, system_time_from_time), including
/// its reading of a negative `sec` with nanoseconds as further before the epoch, so
/// that both transports hand the engine the same time. A time no `SystemTime` can
/// hold is EINVAL where fuser would panic.
fn request_time(sec: u64, nsec: u32) -> Result<SystemTime, Errno> {
    let sec = sec as i64;
    // Duration::new carries the nanoseconds into at most 2^63 + 4 seconds: no
    // overflow there; SystemTime's own range is what is checked.
    let t = if sec >= 0 {
        UNIX_EPOCH.checked_add(Duration::new(sec as u64, nsec))
    } else {
        UNIX_EPOCH.checked_sub(Duration::new(sec.unsigned_abs(), nsec))
    };
    t.ok_or(Errno::EINVAL)
}

/// `fuse_in_header` (40 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    /// Length of the extensions at the end of the payload, in 8-byte units.
    pub total_extlen: u16,
}

impl InHeader {
    /// `None` when `b` is shorter than the header.
    pub fn parse(b: &[u8]) -> Option<InHeader> {
        if b.len() < size::IN_HEADER {
            return None;
        }
        Some(InHeader {
            len: u32_at(b, 0)?,
            opcode: u32_at(b, 4)?,
            unique: u64_at(b, 8)?,
            nodeid: u64_at(b, 16)?,
            uid: u32_at(b, 24)?,
            gid: u32_at(b, 28)?,
            pid: u32_at(b, 32)?,
            total_extlen: u16_at(b, 36)?,
        })
    }
}

/// A decoded request: for each opcode, the arguments fuser 0.18 passes to the
/// matching `Filesystem` callback, less the header's (`nodeid` is that callback's
/// `ino` or `parent`; uid, gid and pid are its `Request`). fuser's macOS-only
/// arguments (setattr's crtime, chgtime, bkuptime and flags, setxattr's position),
/// which it always passes as `None` or 0 on Linux, are left out.
#[derive(Debug, PartialEq)]
pub(crate) enum Op<'a> {
    Lookup {
        name: &'a OsStr,
    },
    /// No reply may be sent. Never comes over the ring, which carries no forgets.
    Forget {
        nlookup: u64,
    },
    Getattr {
        fh: Option<FileHandle>,
    },
    Setattr {
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
    },
    Readlink,
    Symlink {
        link_name: &'a OsStr,
        target: &'a Path,
    },
    Mknod {
        name: &'a OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
    },
    Mkdir {
        name: &'a OsStr,
        mode: u32,
        umask: u32,
    },
    Unlink {
        name: &'a OsStr,
    },
    Rmdir {
        name: &'a OsStr,
    },
    /// FUSE_RENAME (flags empty) and FUSE_RENAME2: fuser calls `rename` for both.
    Rename {
        name: &'a OsStr,
        newparent: INodeNo,
        newname: &'a OsStr,
        flags: RenameFlags,
    },
    /// The header's nodeid is the new parent; `ino` the inode linked.
    Link {
        ino: INodeNo,
        newname: &'a OsStr,
    },
    Open {
        flags: OpenFlags,
    },
    Read {
        fh: FileHandle,
        offset: u64,
        size: u32,
        flags: OpenFlags,
        lock_owner: Option<LockOwner>,
    },
    Write {
        fh: FileHandle,
        offset: u64,
        data: &'a [u8],
        write_flags: WriteFlags,
        flags: OpenFlags,
        lock_owner: Option<LockOwner>,
    },
    Statfs,
    Release {
        fh: FileHandle,
        flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        flush: bool,
    },
    Fsync {
        fh: FileHandle,
        datasync: bool,
    },
    Setxattr {
        name: &'a OsStr,
        value: &'a [u8],
        flags: i32,
    },
    Getxattr {
        name: &'a OsStr,
        size: u32,
    },
    Listxattr {
        size: u32,
    },
    Removexattr {
        name: &'a OsStr,
    },
    Flush {
        fh: FileHandle,
        lock_owner: LockOwner,
    },
    Opendir {
        flags: OpenFlags,
    },
    /// `size` is the most the reply may hold (fuser's `ReplyDirectory` limit).
    Readdir {
        fh: FileHandle,
        offset: u64,
        size: u32,
    },
    Releasedir {
        fh: FileHandle,
        flags: OpenFlags,
    },
    Fsyncdir {
        fh: FileHandle,
        datasync: bool,
    },
    Access {
        mask: AccessFlags,
    },
    Create {
        name: &'a OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
    },
    Destroy,
    Ioctl {
        fh: FileHandle,
        flags: IoctlFlags,
        cmd: u32,
        in_data: &'a [u8],
        out_size: u32,
    },
    Fallocate {
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
    },
    /// `size` is the most the reply may hold (fuser's `ReplyDirectoryPlus` limit).
    Readdirplus {
        fh: FileHandle,
        offset: u64,
        size: u32,
    },
    Lseek {
        fh: FileHandle,
        offset: i64,
        whence: i32,
    },
    /// The header's nodeid is `ino_in`.
    CopyFileRange {
        fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        flags: CopyFileRangeFlags,
    },
    /// An opcode not decoded here, answered ENOSYS as fuser answers what it does
    /// not implement.
    Unknown(u32),
}

/// Decodes one ring request: `op_in` is the entry's op_in area (its first argument
/// at the start), `payload` the entry's payload cut to the `payload_sz` the kernel
/// reported. An error is the errno to answer with: MALFORMED (EIO) for a request
/// that does not parse, or the errno fuser itself answers before calling the
/// filesystem (EINVAL for an offset or time out of range, ENOSYS for an
/// unrestricted ioctl).
pub(crate) fn decode<'a>(
    h: &InHeader,
    op_in: &'a [u8],
    payload: &'a [u8],
) -> Result<Op<'a>, Errno> {
    // Extensions are the last in-argument (fs/fuse/dev.c, fuse_simple_request:
    // total_extlen from in_args[ext_idx]); none is negotiated, so any is dropped.
    let ext = usize::from(h.total_extlen) * 8;
    let payload = payload
        .len()
        .checked_sub(ext)
        .and_then(|n| payload.get(..n))
        .ok_or(MALFORMED)?;
    Ok(match h.opcode {
        opcode::LOOKUP => Op::Lookup {
            name: cstr(payload)?.0,
        },
        opcode::FORGET => {
            let a = arg0(op_in, size::FORGET_IN)?;
            Op::Forget {
                nlookup: field(u64_at(a, 0))?,
            }
        }
        opcode::GETATTR => {
            let a = arg0(op_in, size::GETATTR_IN)?;
            let getattr_flags = field(u32_at(a, 0))?;
            // FUSE_GETATTR_FH
            let fh = (getattr_flags & 1 != 0).then_some(FileHandle(field(u64_at(a, 8))?));
            Op::Getattr { fh }
        }
        opcode::SETATTR => setattr(arg0(op_in, size::SETATTR_IN)?)?,
        opcode::READLINK => Op::Readlink,
        opcode::SYMLINK => {
            let (link_name, rest) = cstr(payload)?;
            let (target, _) = cstr(rest)?;
            Op::Symlink {
                link_name,
                target: Path::new(target),
            }
        }
        opcode::MKNOD => {
            let a = arg0(op_in, size::MKNOD_IN)?;
            Op::Mknod {
                name: cstr(payload)?.0,
                mode: field(u32_at(a, 0))?,
                rdev: field(u32_at(a, 4))?,
                umask: field(u32_at(a, 8))?,
            }
        }
        opcode::MKDIR => {
            let a = arg0(op_in, size::MKDIR_IN)?;
            Op::Mkdir {
                name: cstr(payload)?.0,
                mode: field(u32_at(a, 0))?,
                umask: field(u32_at(a, 4))?,
            }
        }
        opcode::UNLINK => Op::Unlink {
            name: cstr(payload)?.0,
        },
        opcode::RMDIR => Op::Rmdir {
            name: cstr(payload)?.0,
        },
        opcode::RENAME | opcode::RENAME2 => {
            let (a, flags) = if h.opcode == opcode::RENAME {
                (arg0(op_in, size::RENAME_IN)?, RenameFlags::empty())
            } else {
                let a = arg0(op_in, size::RENAME2_IN)?;
                (a, RenameFlags::from_bits_retain(field(u32_at(a, 8))?))
            };
            let (name, rest) = cstr(payload)?;
            let (newname, _) = cstr(rest)?;
            Op::Rename {
                name,
                newparent: INodeNo(field(u64_at(a, 0))?),
                newname,
                flags,
            }
        }
        opcode::LINK => {
            let a = arg0(op_in, size::LINK_IN)?;
            Op::Link {
                ino: INodeNo(field(u64_at(a, 0))?),
                newname: cstr(payload)?.0,
            }
        }
        opcode::OPEN => Op::Open {
            flags: open_flags(arg0(op_in, size::OPEN_IN)?)?,
        },
        opcode::OPENDIR => Op::Opendir {
            flags: open_flags(arg0(op_in, size::OPEN_IN)?)?,
        },
        opcode::READ => {
            let a = arg0(op_in, size::READ_IN)?;
            let read_flags = field(u32_at(a, 20))?;
            Op::Read {
                fh: FileHandle(field(u64_at(a, 0))?),
                offset: off_t(field(u64_at(a, 8))?)?,
                size: field(u32_at(a, 16))?,
                flags: OpenFlags(field(u32_at(a, 32))? as i32),
                // FUSE_READ_LOCKOWNER
                lock_owner: (read_flags & 2 != 0).then_some(LockOwner(field(u64_at(a, 24))?)),
            }
        }
        opcode::WRITE => {
            let a = arg0(op_in, size::WRITE_IN)?;
            let size = field(u32_at(a, 16))?;
            // The data is the whole remaining payload (fs/fuse/file.c,
            // fuse_write_args_fill: in_args[1] of `size` bytes); fuser asserts the
            // two agree.
            if usize::try_from(size).ok() != Some(payload.len()) {
                return Err(MALFORMED);
            }
            let write_flags = WriteFlags::from_bits_retain(field(u32_at(a, 20))?);
            Op::Write {
                fh: FileHandle(field(u64_at(a, 0))?),
                offset: off_t(field(u64_at(a, 8))?)?,
                data: payload,
                write_flags,
                flags: OpenFlags(field(u32_at(a, 32))? as i32),
                lock_owner: write_flags
                    .contains(WriteFlags::FUSE_WRITE_LOCKOWNER)
                    .then_some(LockOwner(field(u64_at(a, 24))?)),
            }
        }
        opcode::STATFS => Op::Statfs,
        opcode::RELEASE => {
            let a = arg0(op_in, size::RELEASE_IN)?;
            let release_flags = field(u32_at(a, 12))?;
            Op::Release {
                fh: FileHandle(field(u64_at(a, 0))?),
                flags: OpenFlags(field(u32_at(a, 8))? as i32),
                // FUSE_RELEASE_FLOCK_UNLOCK
                lock_owner: (release_flags & 2 != 0).then_some(LockOwner(field(u64_at(a, 16))?)),
                // FUSE_RELEASE_FLUSH
                flush: release_flags & 1 != 0,
            }
        }
        opcode::RELEASEDIR => {
            let a = arg0(op_in, size::RELEASE_IN)?;
            Op::Releasedir {
                fh: FileHandle(field(u64_at(a, 0))?),
                flags: OpenFlags(field(u32_at(a, 8))? as i32),
            }
        }
        opcode::FSYNC | opcode::FSYNCDIR => {
            let a = arg0(op_in, size::FSYNC_IN)?;
            let fh = FileHandle(field(u64_at(a, 0))?);
            // FUSE_FSYNC_FDATASYNC
            let datasync = field(u32_at(a, 8))? & 1 != 0;
            if h.opcode == opcode::FSYNC {
                Op::Fsync { fh, datasync }
            } else {
                Op::Fsyncdir { fh, datasync }
            }
        }
        opcode::SETXATTR => {
            let a = arg0(op_in, size::SETXATTR_IN)?;
            let (name, value) = cstr(payload)?;
            // fuser asserts the value is exactly `size` bytes.
            if usize::try_from(field(u32_at(a, 0))?).ok() != Some(value.len()) {
                return Err(MALFORMED);
            }
            Op::Setxattr {
                name,
                value,
                flags: field(u32_at(a, 4))? as i32,
            }
        }
        opcode::GETXATTR => {
            let a = arg0(op_in, size::GETXATTR_IN)?;
            Op::Getxattr {
                name: cstr(payload)?.0,
                size: field(u32_at(a, 0))?,
            }
        }
        opcode::LISTXATTR => {
            let a = arg0(op_in, size::GETXATTR_IN)?;
            Op::Listxattr {
                size: field(u32_at(a, 0))?,
            }
        }
        opcode::REMOVEXATTR => Op::Removexattr {
            name: cstr(payload)?.0,
        },
        opcode::FLUSH => {
            let a = arg0(op_in, size::FLUSH_IN)?;
            Op::Flush {
                fh: FileHandle(field(u64_at(a, 0))?),
                lock_owner: LockOwner(field(u64_at(a, 16))?),
            }
        }
        opcode::READDIR | opcode::READDIRPLUS => {
            let a = arg0(op_in, size::READ_IN)?;
            let fh = FileHandle(field(u64_at(a, 0))?);
            // Unvalidated, as fuser leaves it: a directory offset is a cookie.
            let offset = field(u64_at(a, 8))?;
            let size = field(u32_at(a, 16))?;
            if h.opcode == opcode::READDIR {
                Op::Readdir { fh, offset, size }
            } else {
                Op::Readdirplus { fh, offset, size }
            }
        }
        opcode::ACCESS => {
            let a = arg0(op_in, size::ACCESS_IN)?;
            Op::Access {
                mask: AccessFlags::from_bits_retain(field(u32_at(a, 0))? as i32),
            }
        }
        opcode::CREATE => {
            let a = arg0(op_in, size::CREATE_IN)?;
            Op::Create {
                name: cstr(payload)?.0,
                flags: field(u32_at(a, 0))? as i32,
                mode: field(u32_at(a, 4))?,
                umask: field(u32_at(a, 8))?,
            }
        }
        opcode::DESTROY => Op::Destroy,
        opcode::IOCTL => {
            let a = arg0(op_in, size::IOCTL_IN)?;
            let flags = IoctlFlags::from_bits_retain(field(u32_at(a, 8))?);
            // fuser answers these itself, without calling the filesystem.
            if flags.contains(IoctlFlags::FUSE_IOCTL_UNRESTRICTED) {
                return Err(Errno::ENOSYS);
            }
            let in_size = usize::try_from(field(u32_at(a, 24))?).map_err(|_| MALFORMED)?;
            Op::Ioctl {
                fh: FileHandle(field(u64_at(a, 0))?),
                flags,
                cmd: field(u32_at(a, 12))?,
                in_data: payload.get(..in_size).ok_or(MALFORMED)?,
                out_size: field(u32_at(a, 28))?,
            }
        }
        opcode::FALLOCATE => {
            let a = arg0(op_in, size::FALLOCATE_IN)?;
            Op::Fallocate {
                fh: FileHandle(field(u64_at(a, 0))?),
                offset: off_t(field(u64_at(a, 8))?)?,
                length: off_t(field(u64_at(a, 16))?)?,
                mode: field(u32_at(a, 24))? as i32,
            }
        }
        opcode::LSEEK => {
            let a = arg0(op_in, size::LSEEK_IN)?;
            Op::Lseek {
                fh: FileHandle(field(u64_at(a, 0))?),
                offset: field(u64_at(a, 8))? as i64,
                whence: field(u32_at(a, 16))? as i32,
            }
        }
        opcode::COPY_FILE_RANGE => {
            let a = arg0(op_in, size::COPY_FILE_RANGE_IN)?;
            Op::CopyFileRange {
                fh_in: FileHandle(field(u64_at(a, 0))?),
                offset_in: off_t(field(u64_at(a, 8))?)?,
                ino_out: INodeNo(field(u64_at(a, 16))?),
                fh_out: FileHandle(field(u64_at(a, 24))?),
                offset_out: off_t(field(u64_at(a, 32))?)?,
                len: field(u64_at(a, 40))?,
                flags: CopyFileRangeFlags::from_bits_retain(field(u64_at(a, 48))?),
            }
        }
        other => Op::Unknown(other),
    })
}

fn open_flags(a: &[u8]) -> Result<OpenFlags, Errno> {
    Ok(OpenFlags(field(u32_at(a, 0))? as i32))
}

/// `fuse_setattr_in`: each field only where `valid` has its FATTR_* bit, as fuser
/// reads it (ll/request.rs, SetAttr). FATTR_LOCKOWNER and FATTR_KILL_SUIDGID are
/// not passed on by fuser either.
fn setattr(a: &[u8]) -> Result<Op<'static>, Errno> {
    const MODE: u32 = 1 << 0;
    const UID: u32 = 1 << 1;
    const GID: u32 = 1 << 2;
    const SIZE: u32 = 1 << 3;
    const ATIME: u32 = 1 << 4;
    const MTIME: u32 = 1 << 5;
    const FH: u32 = 1 << 6;
    const ATIME_NOW: u32 = 1 << 7;
    const MTIME_NOW: u32 = 1 << 8;
    const CTIME: u32 = 1 << 10;
    let valid = field(u32_at(a, 0))?;
    let set = |bit: u32| valid & bit != 0;
    let time = |bit: u32, now: u32, sec_at: usize, nsec_at: usize| -> Result<_, Errno> {
        if !set(bit) {
            return Ok(None);
        }
        if set(now) {
            return Ok(Some(TimeOrNow::Now));
        }
        let t = request_time(field(u64_at(a, sec_at))?, field(u32_at(a, nsec_at))?)?;
        Ok(Some(TimeOrNow::SpecificTime(t)))
    };
    Ok(Op::Setattr {
        mode: set(MODE).then_some(field(u32_at(a, 68))?),
        uid: set(UID).then_some(field(u32_at(a, 76))?),
        gid: set(GID).then_some(field(u32_at(a, 80))?),
        size: set(SIZE).then_some(field(u64_at(a, 16))?),
        atime: time(ATIME, ATIME_NOW, 32, 56)?,
        mtime: time(MTIME, MTIME_NOW, 40, 60)?,
        ctime: match set(CTIME) {
            true => Some(request_time(field(u64_at(a, 48))?, field(u32_at(a, 64))?)?),
            false => None,
        },
        fh: set(FH).then_some(FileHandle(field(u64_at(a, 8))?)),
    })
}

/// A reply time as fuser writes it (time.rs, time_from_system_time): before the
/// epoch, whole seconds down and the nanoseconds up from there; out of `i64`
/// range, saturated.
fn reply_time(t: &SystemTime) -> (i64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => match i64::try_from(d.as_secs()) {
            Ok(sec) => (sec, d.subsec_nanos()),
            Err(_) => (i64::MAX, 999_999_999),
        },
        Err(before) => {
            let d = before.duration();
            let (sec, nsec) = (d.as_secs(), d.subsec_nanos());
            if (sec, nsec) >= (i64::MAX as u64 + 1, 0) {
                (i64::MIN, 0)
            } else if nsec == 0 {
                (-(sec as i64), 0)
            } else {
                (-(sec as i64) - 1, 1_000_000_000 - nsec)
            }
        }
    }
}

/// `st_mode` from a kind and permission bits, as fuser makes it
/// (ll/reply.rs, mode_from_kind_and_perm): the bits are or-ed in unmasked.
fn mode(kind: FileType, perm: u16) -> u32 {
    let format = match kind {
        FileType::NamedPipe => libc::S_IFIFO,
        FileType::CharDevice => libc::S_IFCHR,
        FileType::BlockDevice => libc::S_IFBLK,
        FileType::Directory => libc::S_IFDIR,
        FileType::RegularFile => libc::S_IFREG,
        FileType::Symlink => libc::S_IFLNK,
        FileType::Socket => libc::S_IFSOCK,
    };
    format | u32::from(perm)
}

/// Reply struct sizes at minor 40 (include/uapi/linux/fuse.h).
mod out_size {
    pub const OUT_HEADER: usize = 16;
    pub const ATTR: usize = 88;
    pub const ENTRY_OUT: usize = 40 + ATTR;
    pub const ATTR_OUT: usize = 16 + ATTR;
    pub const OPEN_OUT: usize = 16;
    pub const WRITE_OUT: usize = 8;
    pub const STATFS_OUT: usize = 80;
    pub const GETXATTR_OUT: usize = 8;
    pub const IOCTL_OUT: usize = 16;
    pub const LSEEK_OUT: usize = 8;
    pub const DIRENT: usize = 24;
}

/// Writes fields one after the other into a zeroed slice claimed to fit them all,
/// so padding and reserved fields are 0.
struct Put<'b> {
    b: &'b mut [u8],
    at: usize,
}

impl Put<'_> {
    fn put(&mut self, v: &[u8]) {
        let end = self.at + v.len();
        if let Some(dst) = self.b.get_mut(self.at..end) {
            dst.copy_from_slice(v);
        }
        self.at = end;
    }
    fn u32(&mut self, v: u32) {
        self.put(&v.to_ne_bytes());
    }
    fn i32(&mut self, v: i32) {
        self.put(&v.to_ne_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.put(&v.to_ne_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.put(&v.to_ne_bytes());
    }
    fn skip(&mut self, n: usize) {
        self.at += n;
    }

    /// `fuse_attr`, as fuser's fuse_attr_from_attr fills it on Linux: the last
    /// field (`flags` in the uapi header, FUSE_ATTR_SUBMOUNT...) left 0 whatever
    /// `attr.flags` says; crtime not sent.
    fn attr(&mut self, attr: &FileAttr) {
        let (atime, atimensec) = reply_time(&attr.atime);
        let (mtime, mtimensec) = reply_time(&attr.mtime);
        let (ctime, ctimensec) = reply_time(&attr.ctime);
        self.u64(attr.ino.0);
        self.u64(attr.size);
        self.u64(attr.blocks);
        self.i64(atime);
        self.i64(mtime);
        self.i64(ctime);
        self.u32(atimensec);
        self.u32(mtimensec);
        self.u32(ctimensec);
        self.u32(mode(attr.kind, attr.perm));
        self.u32(attr.nlink);
        self.u32(attr.uid);
        self.u32(attr.gid);
        self.u32(attr.rdev);
        self.u32(attr.blksize);
        self.skip(4);
    }

    /// `fuse_entry_out`: the node id is the attributes' inode, one ttl for the
    /// entry and its attributes (fuser's ReplyEntry::entry, ReplyCreate::created,
    /// ReplyDirectoryPlus::add).
    fn entry_out(&mut self, attr: &FileAttr, ttl: Duration, generation: u64) {
        self.u64(attr.ino.0);
        self.u64(generation);
        self.u64(ttl.as_secs());
        self.u64(ttl.as_secs());
        self.u32(ttl.subsec_nanos());
        self.u32(ttl.subsec_nanos());
        self.attr(attr);
    }

    fn open_out(&mut self, fh: u64, open_flags: u32, backing_id: i32) {
        self.u64(fh);
        self.u32(open_flags);
        self.i32(backing_id);
    }

    /// `fuse_dirent` and its name; the claimed slice holds the padding to 8 bytes.
    fn dirent(&mut self, ino: u64, offset: u64, namelen: u32, typ: u32, name: &[u8]) {
        self.u64(ino);
        self.u64(offset);
        self.u32(namelen);
        self.u32(typ);
        self.put(name);
    }
}

/// Writes the `fuse_out_header` of a reply into the entry's header area: `error`
/// is 0 or a negative errno, `payload_len` what the payload holds (fuser's
/// `len` counts the header too, though the ring goes by the entry's `payload_sz`).
/// False, and nothing written, when `buf` is shorter than the header or the length
/// does not fit the field.
#[must_use]
pub(crate) fn out_header(buf: &mut [u8], unique: u64, error: i32, payload_len: usize) -> bool {
    let Some(len) = payload_len
        .checked_add(out_size::OUT_HEADER)
        .and_then(|n| u32::try_from(n).ok())
    else {
        return false;
    };
    let Some(b) = buf.get_mut(..out_size::OUT_HEADER) else {
        return false;
    };
    let mut f = Put { b, at: 0 };
    f.u32(len);
    f.i32(error);
    f.u64(unique);
    true
}

/// Writes one reply's arguments into `payload`, the ring entry's payload buffer,
/// as fuser 0.18 encodes them for `/dev/fuse`. Every method writes all or nothing:
/// false when the buffer (or, for directory entries, the request's size) has no
/// room left.
pub(crate) struct ReplyWriter<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> ReplyWriter<'a> {
    pub fn new(buf: &'a mut [u8]) -> Self {
        ReplyWriter { buf, len: 0 }
    }

    /// The bytes written: the reply's payload length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The next `n` bytes, zeroed, if they end within `limit` and the buffer.
    fn claim(&mut self, n: usize, limit: usize) -> Option<Put<'_>> {
        let end = self.len.checked_add(n)?;
        if end > limit {
            return None;
        }
        let b = self.buf.get_mut(self.len..end)?;
        b.fill(0);
        self.len = end;
        Some(Put { b, at: 0 })
    }

    fn with(&mut self, n: usize, write: impl FnOnce(&mut Put<'_>)) -> bool {
        match self.claim(n, usize::MAX) {
            Some(mut f) => {
                write(&mut f);
                true
            }
            None => false,
        }
    }

    /// `fuse_entry_out` (LOOKUP, MKNOD, MKDIR, SYMLINK, LINK).
    #[must_use]
    pub fn entry(&mut self, attr: &FileAttr, ttl: Duration, generation: u64) -> bool {
        self.with(out_size::ENTRY_OUT, |f| f.entry_out(attr, ttl, generation))
    }

    /// `fuse_attr_out` (GETATTR, SETATTR).
    #[must_use]
    pub fn attr(&mut self, attr: &FileAttr, ttl: Duration) -> bool {
        self.with(out_size::ATTR_OUT, |f| {
            f.u64(ttl.as_secs());
            f.u32(ttl.subsec_nanos());
            f.skip(4);
            f.attr(attr);
        })
    }

    /// `fuse_open_out` (OPEN, OPENDIR). fuser's `opened_passthrough` adds
    /// FOPEN_PASSTHROUGH to the flags itself; here `open_flags` is sent as given,
    /// and `backing_id` is 0 for an open without passthrough.
    #[must_use]
    pub fn open(&mut self, fh: u64, open_flags: u32, backing_id: i32) -> bool {
        self.with(out_size::OPEN_OUT, |f| {
            f.open_out(fh, open_flags, backing_id)
        })
    }

    /// `fuse_entry_out` then `fuse_open_out` (CREATE).
    #[must_use]
    pub fn create(
        &mut self,
        attr: &FileAttr,
        ttl: Duration,
        generation: u64,
        fh: u64,
        open_flags: u32,
        backing_id: i32,
    ) -> bool {
        self.with(out_size::ENTRY_OUT + out_size::OPEN_OUT, |f| {
            f.entry_out(attr, ttl, generation);
            f.open_out(fh, open_flags, backing_id);
        })
    }

    /// `fuse_write_out` (WRITE, COPY_FILE_RANGE).
    #[must_use]
    pub fn write(&mut self, size: u32) -> bool {
        self.with(out_size::WRITE_OUT, |f| f.u32(size))
    }

    /// `fuse_statfs_out`.
    #[must_use]
    pub fn statfs(&mut self, s: &StatFs) -> bool {
        self.with(out_size::STATFS_OUT, |f| {
            f.u64(s.blocks);
            f.u64(s.bfree);
            f.u64(s.bavail);
            f.u64(s.files);
            f.u64(s.ffree);
            f.u32(s.bsize);
            f.u32(s.namelen);
            f.u32(s.frsize);
        })
    }

    /// `fuse_getxattr_out` (GETXATTR, LISTXATTR asked with size 0).
    #[must_use]
    pub fn xattr_size(&mut self, size: u32) -> bool {
        self.with(out_size::GETXATTR_OUT, |f| f.u32(size))
    }

    /// Raw bytes (READ, READLINK, GETXATTR and LISTXATTR data).
    #[must_use]
    pub fn data(&mut self, bytes: &[u8]) -> bool {
        self.with(bytes.len(), |f| f.put(bytes))
    }

    /// `fuse_ioctl_out` then the output data. fuser sends one input and one output
    /// iovec count whatever the data, which the kernel reads only on a retry.
    #[must_use]
    pub fn ioctl(&mut self, result: i32, data: &[u8]) -> bool {
        let Some(n) = out_size::IOCTL_OUT.checked_add(data.len()) else {
            return false;
        };
        self.with(n, |f| {
            f.i32(result);
            f.u32(0);
            f.u32(1);
            f.u32(1);
            f.put(data);
        })
    }

    /// `fuse_lseek_out`.
    #[must_use]
    pub fn lseek(&mut self, offset: i64) -> bool {
        self.with(out_size::LSEEK_OUT, |f| f.i64(offset))
    }

    /// Appends one READDIR `fuse_dirent`, padded to 8 bytes; false, and nothing
    /// written, when it would take the reply past `max` (the request's size) or
    /// the buffer. Note the sense: fuser's `ReplyDirectory::add` returns true when
    /// full.
    #[must_use]
    pub fn dirent(
        &mut self,
        max: usize,
        ino: u64,
        offset: u64,
        kind: FileType,
        name: &OsStr,
    ) -> bool {
        let name = name.as_bytes();
        let Some((namelen, n)) = record(out_size::DIRENT, name) else {
            return false;
        };
        let Some(mut f) = self.claim(n, max) else {
            return false;
        };
        f.dirent(ino, offset, namelen, mode(kind, 0) >> 12, name);
        true
    }

    /// Appends one READDIRPLUS `fuse_direntplus` (entry, then dirent and name),
    /// padded to 8 bytes, as fuser's `ReplyDirectoryPlus::add`: both inode numbers
    /// are the attributes', the type is their mode's. False, and nothing written,
    /// when it does not fit in `max` (the request's size) or the buffer.
    #[must_use]
    pub fn direntplus(
        &mut self,
        max: usize,
        attr: &FileAttr,
        ttl: Duration,
        generation: u64,
        offset: u64,
        name: &OsStr,
    ) -> bool {
        let name = name.as_bytes();
        let Some((namelen, n)) = record(out_size::ENTRY_OUT + out_size::DIRENT, name) else {
            return false;
        };
        let Some(mut f) = self.claim(n, max) else {
            return false;
        };
        f.entry_out(attr, ttl, generation);
        let typ = mode(attr.kind, attr.perm) >> 12;
        f.dirent(attr.ino.0, offset, namelen, typ, name);
        true
    }
}

/// A directory record's name length and whole size (`head` plus the name, rounded
/// up to 8 bytes: FUSE_DIRENT_ALIGN), if they fit their fields.
fn record(head: usize, name: &[u8]) -> Option<(u32, usize)> {
    let namelen = u32::try_from(name.len()).ok()?;
    let n = head.checked_add(name.len())?.checked_next_multiple_of(8)?;
    Some((namelen, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A statfs answer whose fields all differ, in wire order.
    const STATFS: StatFs = StatFs {
        blocks: 1,
        bfree: 2,
        bavail: 3,
        files: 4,
        ffree: 5,
        bsize: 6,
        namelen: 7,
        frsize: 8,
    };

    /// A first argument or reply struct assembled field by field, native-endian.
    #[derive(Default)]
    struct Fields(Vec<u8>);

    impl Fields {
        fn u16(mut self, v: u16) -> Self {
            self.0.extend_from_slice(&v.to_ne_bytes());
            self
        }
        fn u32(mut self, v: u32) -> Self {
            self.0.extend_from_slice(&v.to_ne_bytes());
            self
        }
        fn u64(mut self, v: u64) -> Self {
            self.0.extend_from_slice(&v.to_ne_bytes());
            self
        }
    }

    /// The 128-byte op_in area with `arg0` at its start and, after it, bytes an
    /// earlier request could have left there.
    fn op_in(arg0: &Fields) -> Vec<u8> {
        let mut area = vec![0xa5; 128];
        area[..arg0.0.len()].copy_from_slice(&arg0.0);
        area
    }

    fn header(opcode: u32, total_extlen: u16) -> InHeader {
        let raw = Fields::default()
            .u32(0)
            .u32(opcode)
            .u64(7)
            .u64(42)
            .u32(1000)
            .u32(100)
            .u32(4321)
            .u16(total_extlen)
            .u16(0xffff);
        InHeader::parse(&raw.0).unwrap()
    }

    fn dec<'a>(opcode: u32, op_in: &'a [u8], payload: &'a [u8]) -> Result<Op<'a>, Errno> {
        decode(&header(opcode, 0), op_in, payload)
    }

    fn os(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    #[test]
    fn in_header_fields_at_their_offsets() {
        let raw = Fields::default()
            .u32(0x1122_3344)
            .u32(opcode::WRITE)
            .u64(0x0102_0304_0506_0708)
            .u64(0x1112_1314_1516_1718)
            .u32(1001)
            .u32(1002)
            .u32(1003)
            .u16(3)
            .u16(0xbeef);
        assert_eq!(raw.0.len(), 40);
        let h = InHeader::parse(&raw.0).unwrap();
        assert_eq!(
            h,
            InHeader {
                len: 0x1122_3344,
                opcode: opcode::WRITE,
                unique: 0x0102_0304_0506_0708,
                nodeid: 0x1112_1314_1516_1718,
                uid: 1001,
                gid: 1002,
                pid: 1003,
                total_extlen: 3,
            }
        );
        for n in 0..40 {
            assert_eq!(InHeader::parse(&raw.0[..n]), None, "{n} bytes");
        }
        // A longer buffer (the 128-byte header area) is read from its start.
        let mut area = raw.0.clone();
        area.resize(128, 0xff);
        assert_eq!(InHeader::parse(&area), Some(h));
    }

    #[test]
    fn zero_arg0_ops_read_only_the_payload() {
        // LOOKUP, UNLINK, RMDIR and REMOVEXATTR: fuse_set_zero_arg0, then the name.
        let garbage = vec![0xa5; 128];
        assert_eq!(
            dec(opcode::LOOKUP, &garbage, b"name\0"),
            Ok(Op::Lookup { name: os("name") })
        );
        assert_eq!(
            dec(opcode::UNLINK, &[], b"gone\0"),
            Ok(Op::Unlink { name: os("gone") })
        );
        assert_eq!(
            dec(opcode::RMDIR, &[], b"dir\0"),
            Ok(Op::Rmdir { name: os("dir") })
        );
        assert_eq!(
            dec(opcode::REMOVEXATTR, &[], b"user.x\0"),
            Ok(Op::Removexattr { name: os("user.x") })
        );
        // SYMLINK: the entry's name, then the target.
        assert_eq!(
            dec(opcode::SYMLINK, &[], b"link\0../target\0"),
            Ok(Op::Symlink {
                link_name: os("link"),
                target: Path::new("../target"),
            })
        );
        // Names are bytes, not UTF-8.
        let Ok(Op::Lookup { name }) = dec(opcode::LOOKUP, &[], b"\xff\xfe\0") else {
            panic!("not a lookup");
        };
        assert_eq!(name.as_bytes(), b"\xff\xfe");
    }

    #[test]
    fn argumentless_ops() {
        assert_eq!(dec(opcode::READLINK, &[], &[]), Ok(Op::Readlink));
        assert_eq!(dec(opcode::STATFS, &[], &[]), Ok(Op::Statfs));
        assert_eq!(dec(opcode::DESTROY, &[], &[]), Ok(Op::Destroy));
    }

    #[test]
    fn unknown_opcodes() {
        // INIT, GETLK, SETLK, SETLKW, INTERRUPT, BMAP, POLL, NOTIFY_REPLY,
        // BATCH_FORGET, SYNCFS, TMPFILE, STATX, and what no kernel sends.
        for code in [
            0,
            7,
            19,
            26,
            31,
            32,
            33,
            36,
            37,
            40,
            41,
            42,
            50,
            51,
            52,
            4096,
            u32::MAX,
        ] {
            assert_eq!(dec(code, &[], &[]), Ok(Op::Unknown(code)), "opcode {code}");
        }
    }

    #[test]
    fn forget() {
        let a = Fields::default().u64(9);
        assert_eq!(
            dec(opcode::FORGET, &op_in(&a), &[]),
            Ok(Op::Forget { nlookup: 9 })
        );
    }

    #[test]
    fn getattr_with_and_without_a_handle() {
        // fuse_getattr_in: getattr_flags, dummy, fh; FUSE_GETATTR_FH = 1.
        let with = Fields::default().u32(1).u32(0).u64(77);
        assert_eq!(
            dec(opcode::GETATTR, &op_in(&with), &[]),
            Ok(Op::Getattr {
                fh: Some(FileHandle(77))
            })
        );
        let without = Fields::default().u32(0).u32(0).u64(77);
        assert_eq!(
            dec(opcode::GETATTR, &op_in(&without), &[]),
            Ok(Op::Getattr { fh: None })
        );
    }

    /// fuse_setattr_in with every field set to a distinct value.
    fn setattr_in(valid: u32, atime: i64, atimensec: u32) -> Fields {
        Fields::default()
            .u32(valid)
            .u32(0)
            .u64(55) // fh
            .u64(4096) // size
            .u64(66) // lock_owner
            .u64(atime as u64)
            .u64(2_000_000_000) // mtime
            .u64(3_000_000_000) // ctime
            .u32(atimensec)
            .u32(200)
            .u32(300)
            .u32(0o4755) // mode
            .u32(0)
            .u32(1001) // uid
            .u32(1002) // gid
            .u32(0)
    }

    #[test]
    fn setattr_fields_by_valid_bits() {
        let a = setattr_in(0, 1, 1);
        assert_eq!(a.0.len(), 88);
        assert_eq!(
            dec(opcode::SETATTR, &op_in(&a), &[]),
            Ok(Op::Setattr {
                mode: None,
                uid: None,
                gid: None,
                size: None,
                atime: None,
                mtime: None,
                ctime: None,
                fh: None,
            })
        );
        // MODE|UID|GID|SIZE|ATIME|MTIME|FH|LOCKOWNER|CTIME|KILL_SUIDGID
        let all = 0x7f | 1 << 9 | 1 << 10 | 1 << 11;
        let a = setattr_in(all, 1_000_000_000, 100);
        let at = |s: u64, n: u32| UNIX_EPOCH + Duration::new(s, n);
        assert_eq!(
            dec(opcode::SETATTR, &op_in(&a), &[]),
            Ok(Op::Setattr {
                mode: Some(0o4755),
                uid: Some(1001),
                gid: Some(1002),
                size: Some(4096),
                atime: Some(TimeOrNow::SpecificTime(at(1_000_000_000, 100))),
                mtime: Some(TimeOrNow::SpecificTime(at(2_000_000_000, 200))),
                ctime: Some(at(3_000_000_000, 300)),
                fh: Some(FileHandle(55)),
            })
        );
        // ATIME_NOW and MTIME_NOW win over the times sent.
        let a = setattr_in(1 << 4 | 1 << 5 | 1 << 7 | 1 << 8, 5, 5);
        let Ok(Op::Setattr { atime, mtime, .. }) = dec(opcode::SETATTR, &op_in(&a), &[]) else {
            panic!("not a setattr");
        };
        assert_eq!((atime, mtime), (Some(TimeOrNow::Now), Some(TimeOrNow::Now)));
    }

    #[test]
    fn setattr_times_before_the_epoch_as_fuser_reads_them() {
        // fuser's system_time_from_time: EPOCH - Duration::new(-sec, nsec).
        let a = setattr_in(1 << 4, -2, 300_000_000);
        let Ok(Op::Setattr { atime, .. }) = dec(opcode::SETATTR, &op_in(&a), &[]) else {
            panic!("not a setattr");
        };
        let expected = UNIX_EPOCH - Duration::new(2, 300_000_000);
        assert_eq!(atime, Some(TimeOrNow::SpecificTime(expected)));
        // Out of any SystemTime's range: refused, where fuser would panic.
        let a = setattr_in(1 << 4, i64::MIN, 999_999_999);
        assert_eq!(dec(opcode::SETATTR, &op_in(&a), &[]), Err(Errno::EINVAL));
    }

    #[test]
    fn mknod_mkdir_create() {
        // fuse_mknod_in: mode, rdev, umask, padding.
        let a = Fields::default().u32(0o20644).u32(0x0801).u32(0o022).u32(0);
        assert_eq!(
            dec(opcode::MKNOD, &op_in(&a), b"dev\0"),
            Ok(Op::Mknod {
                name: os("dev"),
                mode: 0o20644,
                umask: 0o022,
                rdev: 0x0801,
            })
        );
        // fuse_mkdir_in: mode, umask.
        let a = Fields::default().u32(0o755).u32(0o027);
        assert_eq!(
            dec(opcode::MKDIR, &op_in(&a), b"d\0"),
            Ok(Op::Mkdir {
                name: os("d"),
                mode: 0o755,
                umask: 0o027,
            })
        );
        // fuse_create_in: flags, mode, umask, open_flags.
        let a = Fields::default()
            .u32(0o101101)
            .u32(0o100600)
            .u32(0o002)
            .u32(1);
        assert_eq!(
            dec(opcode::CREATE, &op_in(&a), b"f\0"),
            Ok(Op::Create {
                name: os("f"),
                mode: 0o100600,
                umask: 0o002,
                flags: 0o101101,
            })
        );
    }

    #[test]
    fn rename_and_rename2() {
        // fuse_rename_in: newdir only.
        let a = Fields::default().u64(12);
        assert_eq!(
            dec(opcode::RENAME, &op_in(&a), b"old\0new\0"),
            Ok(Op::Rename {
                name: os("old"),
                newparent: INodeNo(12),
                newname: os("new"),
                flags: RenameFlags::empty(),
            })
        );
        // fuse_rename2_in: newdir, flags, padding.
        let a = Fields::default().u64(13).u32(libc::RENAME_EXCHANGE).u32(0);
        assert_eq!(
            dec(opcode::RENAME2, &op_in(&a), b"a\0b\0"),
            Ok(Op::Rename {
                name: os("a"),
                newparent: INodeNo(13),
                newname: os("b"),
                flags: RenameFlags::RENAME_EXCHANGE,
            })
        );
        // Flags fuser has no name for are kept, for the adapter to refuse.
        let a = Fields::default().u64(13).u32(1 << 7).u32(0);
        let Ok(Op::Rename { flags, .. }) = dec(opcode::RENAME2, &op_in(&a), b"a\0b\0") else {
            panic!("not a rename");
        };
        assert_eq!(flags.bits(), 1 << 7);
    }

    #[test]
    fn link() {
        // fuse_link_in: oldnodeid.
        let a = Fields::default().u64(99);
        assert_eq!(
            dec(opcode::LINK, &op_in(&a), b"hard\0"),
            Ok(Op::Link {
                ino: INodeNo(99),
                newname: os("hard"),
            })
        );
    }

    #[test]
    fn open_and_opendir() {
        // fuse_open_in: flags, open_flags.
        let a = Fields::default().u32(0o2).u32(1);
        assert_eq!(
            dec(opcode::OPEN, &op_in(&a), &[]),
            Ok(Op::Open {
                flags: OpenFlags(0o2)
            })
        );
        let a = Fields::default().u32(0o200000).u32(0);
        assert_eq!(
            dec(opcode::OPENDIR, &op_in(&a), &[]),
            Ok(Op::Opendir {
                flags: OpenFlags(0o200000)
            })
        );
    }

    /// fuse_read_in / fuse_write_in: fh, offset, size, read/write flags,
    /// lock_owner, flags, padding.
    fn io_in(offset: u64, size: u32, io_flags: u32) -> Fields {
        Fields::default()
            .u64(5)
            .u64(offset)
            .u32(size)
            .u32(io_flags)
            .u64(0xabcd)
            .u32(0o100002)
            .u32(0)
    }

    #[test]
    fn read() {
        assert_eq!(
            dec(opcode::READ, &op_in(&io_in(8192, 4096, 0)), &[]),
            Ok(Op::Read {
                fh: FileHandle(5),
                offset: 8192,
                size: 4096,
                flags: OpenFlags(0o100002),
                lock_owner: None,
            })
        );
        // FUSE_READ_LOCKOWNER = 2.
        let Ok(Op::Read { lock_owner, .. }) = dec(opcode::READ, &op_in(&io_in(0, 1, 2)), &[])
        else {
            panic!("not a read");
        };
        assert_eq!(lock_owner, Some(LockOwner(0xabcd)));
        let a = io_in(1 << 63, 1, 0);
        assert_eq!(dec(opcode::READ, &op_in(&a), &[]), Err(Errno::EINVAL));
    }

    #[test]
    fn write() {
        // FUSE_WRITE_LOCKOWNER | FUSE_WRITE_KILL_SUIDGID
        let a = io_in(10, 3, 2 | 4);
        assert_eq!(
            dec(opcode::WRITE, &op_in(&a), b"abc"),
            Ok(Op::Write {
                fh: FileHandle(5),
                offset: 10,
                data: b"abc",
                write_flags: WriteFlags::FUSE_WRITE_LOCKOWNER | WriteFlags::FUSE_WRITE_KILL_SUIDGID,
                flags: OpenFlags(0o100002),
                lock_owner: Some(LockOwner(0xabcd)),
            })
        );
        let Ok(Op::Write { lock_owner, .. }) = dec(opcode::WRITE, &op_in(&io_in(0, 0, 0)), &[])
        else {
            panic!("not a write");
        };
        assert_eq!(lock_owner, None);
        // The data must be exactly `size` bytes.
        assert_eq!(dec(opcode::WRITE, &op_in(&a), b"ab"), Err(MALFORMED));
        assert_eq!(dec(opcode::WRITE, &op_in(&a), b"abcd"), Err(MALFORMED));
        let a = io_in(u64::MAX, 0, 0);
        assert_eq!(dec(opcode::WRITE, &op_in(&a), &[]), Err(Errno::EINVAL));
    }

    #[test]
    fn release_and_releasedir() {
        // fuse_release_in: fh, flags, release_flags, lock_owner.
        let rel = |release_flags: u32| Fields::default().u64(8).u32(0o2).u32(release_flags).u64(31);
        assert_eq!(
            dec(opcode::RELEASE, &op_in(&rel(0)), &[]),
            Ok(Op::Release {
                fh: FileHandle(8),
                flags: OpenFlags(0o2),
                lock_owner: None,
                flush: false,
            })
        );
        // FUSE_RELEASE_FLUSH = 1, FUSE_RELEASE_FLOCK_UNLOCK = 2.
        assert_eq!(
            dec(opcode::RELEASE, &op_in(&rel(3)), &[]),
            Ok(Op::Release {
                fh: FileHandle(8),
                flags: OpenFlags(0o2),
                lock_owner: Some(LockOwner(31)),
                flush: true,
            })
        );
        assert_eq!(
            dec(opcode::RELEASEDIR, &op_in(&rel(3)), &[]),
            Ok(Op::Releasedir {
                fh: FileHandle(8),
                flags: OpenFlags(0o2),
            })
        );
    }

    #[test]
    fn fsync_and_fsyncdir() {
        // fuse_fsync_in: fh, fsync_flags, padding; FUSE_FSYNC_FDATASYNC = 1.
        let a = |flags: u32| Fields::default().u64(4).u32(flags).u32(0);
        assert_eq!(
            dec(opcode::FSYNC, &op_in(&a(1)), &[]),
            Ok(Op::Fsync {
                fh: FileHandle(4),
                datasync: true,
            })
        );
        assert_eq!(
            dec(opcode::FSYNCDIR, &op_in(&a(0)), &[]),
            Ok(Op::Fsyncdir {
                fh: FileHandle(4),
                datasync: false,
            })
        );
    }

    #[test]
    fn xattrs() {
        // fuse_setxattr_in without FUSE_SETXATTR_EXT: size, flags (8 bytes).
        let a = Fields::default().u32(3).u32(libc::XATTR_CREATE as u32);
        assert_eq!(
            dec(opcode::SETXATTR, &op_in(&a), b"user.k\0v\0w"),
            Ok(Op::Setxattr {
                name: os("user.k"),
                value: b"v\0w",
                flags: libc::XATTR_CREATE,
            })
        );
        assert_eq!(
            dec(opcode::SETXATTR, &op_in(&a), b"user.k\0vw"),
            Err(MALFORMED)
        );
        let empty = Fields::default().u32(0).u32(0);
        assert_eq!(
            dec(opcode::SETXATTR, &op_in(&empty), b"user.e\0"),
            Ok(Op::Setxattr {
                name: os("user.e"),
                value: b"",
                flags: 0,
            })
        );
        // fuse_getxattr_in: size, padding.
        let a = Fields::default().u32(256).u32(0);
        assert_eq!(
            dec(opcode::GETXATTR, &op_in(&a), b"user.k\0"),
            Ok(Op::Getxattr {
                name: os("user.k"),
                size: 256,
            })
        );
        assert_eq!(
            dec(opcode::LISTXATTR, &op_in(&a), &[]),
            Ok(Op::Listxattr { size: 256 })
        );
    }

    #[test]
    fn flush() {
        // fuse_flush_in: fh, unused, padding, lock_owner.
        let a = Fields::default().u64(6).u32(0).u32(0).u64(0x55);
        assert_eq!(
            dec(opcode::FLUSH, &op_in(&a), &[]),
            Ok(Op::Flush {
                fh: FileHandle(6),
                lock_owner: LockOwner(0x55),
            })
        );
    }

    #[test]
    fn readdir_and_readdirplus() {
        // fuse_read_in; a directory offset is a cookie, never refused.
        let a = io_in(u64::MAX, 4096, 0);
        assert_eq!(
            dec(opcode::READDIR, &op_in(&a), &[]),
            Ok(Op::Readdir {
                fh: FileHandle(5),
                offset: u64::MAX,
                size: 4096,
            })
        );
        assert_eq!(
            dec(opcode::READDIRPLUS, &op_in(&a), &[]),
            Ok(Op::Readdirplus {
                fh: FileHandle(5),
                offset: u64::MAX,
                size: 4096,
            })
        );
    }

    #[test]
    fn access() {
        // fuse_access_in: mask, padding.
        let a = Fields::default()
            .u32(libc::R_OK as u32 | libc::X_OK as u32)
            .u32(0);
        assert_eq!(
            dec(opcode::ACCESS, &op_in(&a), &[]),
            Ok(Op::Access {
                mask: AccessFlags::R_OK | AccessFlags::X_OK
            })
        );
    }

    /// fuse_ioctl_in: fh, flags, cmd, arg, in_size, out_size.
    fn ioctl_in(flags: u32, in_size: u32) -> Fields {
        Fields::default()
            .u64(3)
            .u32(flags)
            .u32(libc::FS_IOC_SETFLAGS as u32)
            .u64(0x7fff_0000)
            .u32(in_size)
            .u32(0)
    }

    #[test]
    fn ioctl() {
        // FUSE_IOCTL_DIR = 16; the input data is the payload.
        assert_eq!(
            dec(opcode::IOCTL, &op_in(&ioctl_in(16, 4)), &[1, 2, 3, 4]),
            Ok(Op::Ioctl {
                fh: FileHandle(3),
                flags: IoctlFlags::FUSE_IOCTL_DIR,
                cmd: libc::FS_IOC_SETFLAGS as u32,
                in_data: &[1, 2, 3, 4],
                out_size: 0,
            })
        );
        assert_eq!(
            dec(opcode::IOCTL, &op_in(&ioctl_in(0, 5)), &[1, 2, 3, 4]),
            Err(MALFORMED)
        );
        // FUSE_IOCTL_UNRESTRICTED = 2: answered by fuser itself, ENOSYS.
        assert_eq!(
            dec(opcode::IOCTL, &op_in(&ioctl_in(2, 0)), &[]),
            Err(Errno::ENOSYS)
        );
    }

    #[test]
    fn fallocate() {
        // fuse_fallocate_in: fh, offset, length, mode, padding.
        let a = |offset: u64, length: u64| {
            Fields::default()
                .u64(2)
                .u64(offset)
                .u64(length)
                .u32(libc::FALLOC_FL_KEEP_SIZE as u32)
                .u32(0)
        };
        assert_eq!(
            dec(opcode::FALLOCATE, &op_in(&a(100, 200)), &[]),
            Ok(Op::Fallocate {
                fh: FileHandle(2),
                offset: 100,
                length: 200,
                mode: libc::FALLOC_FL_KEEP_SIZE,
            })
        );
        for (offset, length) in [(1 << 63, 0), (0, 1 << 63)] {
            assert_eq!(
                dec(opcode::FALLOCATE, &op_in(&a(offset, length)), &[]),
                Err(Errno::EINVAL)
            );
        }
    }

    #[test]
    fn lseek() {
        // fuse_lseek_in: fh, offset, whence, padding.
        let a = Fields::default()
            .u64(9)
            .u64(-5i64 as u64)
            .u32(libc::SEEK_DATA as u32)
            .u32(0);
        assert_eq!(
            dec(opcode::LSEEK, &op_in(&a), &[]),
            Ok(Op::Lseek {
                fh: FileHandle(9),
                offset: -5,
                whence: libc::SEEK_DATA,
            })
        );
    }

    #[test]
    fn copy_file_range() {
        // fuse_copy_file_range_in: fh_in, off_in, nodeid_out, fh_out, off_out, len,
        // flags.
        let a = |off_in: u64, off_out: u64| {
            Fields::default()
                .u64(1)
                .u64(off_in)
                .u64(50)
                .u64(2)
                .u64(off_out)
                .u64(1 << 20)
                .u64(0)
        };
        assert_eq!(
            dec(opcode::COPY_FILE_RANGE, &op_in(&a(10, 20)), &[]),
            Ok(Op::CopyFileRange {
                fh_in: FileHandle(1),
                offset_in: 10,
                ino_out: INodeNo(50),
                fh_out: FileHandle(2),
                offset_out: 20,
                len: 1 << 20,
                flags: CopyFileRangeFlags::empty(),
            })
        );
        for (off_in, off_out) in [(1 << 63, 0), (0, 1 << 63)] {
            assert_eq!(
                dec(opcode::COPY_FILE_RANGE, &op_in(&a(off_in, off_out)), &[]),
                Err(Errno::EINVAL)
            );
        }
    }

    #[test]
    fn extensions_are_dropped_from_the_payload_end() {
        // One 8-byte unit of extension after the name.
        let payload = b"name\0\x10\0\0\0\x20\0\0\0";
        assert_eq!(
            decode(&header(opcode::LOOKUP, 1), &[], payload),
            Ok(Op::Lookup { name: os("name") })
        );
        // A write whose data would otherwise take the extension in.
        let a = io_in(0, 2, 0);
        assert_eq!(
            decode(&header(opcode::WRITE, 1), &op_in(&a), b"hi\0\0\0\0\0\0\0\0")
                .map(|op| matches!(op, Op::Write { data: b"hi", .. })),
            Ok(true)
        );
        // More extension than payload.
        assert_eq!(
            decode(&header(opcode::LOOKUP, 2), &[], payload),
            Err(MALFORMED)
        );
        assert_eq!(
            decode(&header(opcode::STATFS, u16::MAX), &[], &[]),
            Err(MALFORMED)
        );
    }

    #[test]
    fn names_need_their_nul() {
        for opcode in [
            opcode::LOOKUP,
            opcode::UNLINK,
            opcode::RMDIR,
            opcode::REMOVEXATTR,
            opcode::SYMLINK,
        ] {
            assert_eq!(dec(opcode, &[], b"name"), Err(MALFORMED), "opcode {opcode}");
            assert_eq!(dec(opcode, &[], b""), Err(MALFORMED), "opcode {opcode}");
        }
        // The second name of a symlink or rename too.
        assert_eq!(dec(opcode::SYMLINK, &[], b"l\0target"), Err(MALFORMED));
        let a = Fields::default().u64(1);
        assert_eq!(dec(opcode::RENAME, &op_in(&a), b"a\0b"), Err(MALFORMED));
    }

    /// Every opcode decoded here with a well-formed first argument and payload.
    fn well_formed() -> Vec<(u32, Vec<u8>, Vec<u8>)> {
        let zero = |n: usize| op_in(&Fields(vec![0; n]));
        let name = b"n\0".to_vec();
        vec![
            (opcode::LOOKUP, vec![], name.clone()),
            (opcode::FORGET, zero(size::FORGET_IN), vec![]),
            (
                opcode::GETATTR,
                op_in(&Fields::default().u32(1).u32(0).u64(1)),
                vec![],
            ),
            (opcode::SETATTR, op_in(&setattr_in(0x7ff, 1, 1)), vec![]),
            (opcode::SYMLINK, vec![], b"l\0t\0".to_vec()),
            (opcode::MKNOD, zero(size::MKNOD_IN), name.clone()),
            (opcode::MKDIR, zero(size::MKDIR_IN), name.clone()),
            (opcode::UNLINK, vec![], name.clone()),
            (opcode::RMDIR, vec![], name.clone()),
            (opcode::RENAME, zero(size::RENAME_IN), b"a\0b\0".to_vec()),
            (opcode::RENAME2, zero(size::RENAME2_IN), b"a\0b\0".to_vec()),
            (opcode::LINK, zero(size::LINK_IN), name.clone()),
            (opcode::OPEN, zero(size::OPEN_IN), vec![]),
            (opcode::READ, op_in(&io_in(0, 1, 2)), vec![]),
            (opcode::WRITE, op_in(&io_in(0, 3, 2)), b"abc".to_vec()),
            (opcode::RELEASE, zero(size::RELEASE_IN), vec![]),
            (opcode::FSYNC, zero(size::FSYNC_IN), vec![]),
            (
                opcode::SETXATTR,
                op_in(&Fields::default().u32(2).u32(0)),
                b"x\0vv".to_vec(),
            ),
            (opcode::GETXATTR, zero(size::GETXATTR_IN), name.clone()),
            (opcode::LISTXATTR, zero(size::GETXATTR_IN), vec![]),
            (opcode::REMOVEXATTR, vec![], name.clone()),
            (opcode::FLUSH, zero(size::FLUSH_IN), vec![]),
            (opcode::OPENDIR, zero(size::OPEN_IN), vec![]),
            (opcode::READDIR, zero(size::READ_IN), vec![]),
            (opcode::RELEASEDIR, zero(size::RELEASE_IN), vec![]),
            (opcode::FSYNCDIR, zero(size::FSYNC_IN), vec![]),
            (opcode::ACCESS, zero(size::ACCESS_IN), vec![]),
            (opcode::CREATE, zero(size::CREATE_IN), name.clone()),
            (opcode::IOCTL, op_in(&ioctl_in(0, 4)), vec![1, 2, 3, 4]),
            (opcode::FALLOCATE, zero(size::FALLOCATE_IN), vec![]),
            (opcode::READDIRPLUS, zero(size::READ_IN), vec![]),
            (opcode::LSEEK, zero(size::LSEEK_IN), vec![]),
            (
                opcode::COPY_FILE_RANGE,
                zero(size::COPY_FILE_RANGE_IN),
                vec![],
            ),
        ]
    }

    /// The size of each opcode's first argument, 0 where the kernel sends none.
    fn arg0_size(code: u32) -> usize {
        match code {
            opcode::FORGET => size::FORGET_IN,
            opcode::GETATTR => size::GETATTR_IN,
            opcode::SETATTR => size::SETATTR_IN,
            opcode::MKNOD => size::MKNOD_IN,
            opcode::MKDIR => size::MKDIR_IN,
            opcode::RENAME => size::RENAME_IN,
            opcode::RENAME2 => size::RENAME2_IN,
            opcode::LINK => size::LINK_IN,
            opcode::OPEN | opcode::OPENDIR => size::OPEN_IN,
            opcode::READ | opcode::READDIR | opcode::READDIRPLUS => size::READ_IN,
            opcode::WRITE => size::WRITE_IN,
            opcode::RELEASE | opcode::RELEASEDIR => size::RELEASE_IN,
            opcode::FSYNC | opcode::FSYNCDIR => size::FSYNC_IN,
            opcode::SETXATTR => size::SETXATTR_IN,
            opcode::GETXATTR | opcode::LISTXATTR => size::GETXATTR_IN,
            opcode::FLUSH => size::FLUSH_IN,
            opcode::ACCESS => size::ACCESS_IN,
            opcode::CREATE => size::CREATE_IN,
            opcode::IOCTL => size::IOCTL_IN,
            opcode::FALLOCATE => size::FALLOCATE_IN,
            opcode::LSEEK => size::LSEEK_IN,
            opcode::COPY_FILE_RANGE => size::COPY_FILE_RANGE_IN,
            _ => 0,
        }
    }

    #[test]
    fn truncated_requests_are_refused() {
        for (code, op_in, payload) in well_formed() {
            assert!(
                dec(code, &op_in, &payload).is_ok(),
                "opcode {code} well formed"
            );
            let need = arg0_size(code);
            for n in 0..need {
                assert_eq!(
                    dec(code, &op_in[..n], &payload),
                    Err(MALFORMED),
                    "opcode {code} with {n} of {need} bytes of its first argument"
                );
            }
            // Every shorter payload of an op that has one: a lost NUL, short data.
            for n in 0..payload.len() {
                assert!(
                    dec(code, &op_in, &payload[..n]).is_err(),
                    "opcode {code} with {n} of {} payload bytes",
                    payload.len()
                );
            }
        }
    }

    /// xorshift64*: reproducible noise without a dependency.
    struct Noise(u64);

    impl Noise {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> usize {
            (self.next() % n) as usize
        }
        /// Up to `max - 1` noise bytes.
        fn bytes(&mut self, max: u64) -> Vec<u8> {
            let n = self.below(max);
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
        for _ in 0..200_000 {
            let raw = noise.bytes(48);
            let Some(mut h) = InHeader::parse(&raw) else {
                assert!(raw.len() < 40);
                continue;
            };
            // Mostly opcodes that are decoded, with few or no extensions.
            h.opcode = match noise.below(4) {
                0 => h.opcode,
                _ => noise.below(50) as u32,
            };
            if noise.below(4) != 0 {
                h.total_extlen = noise.below(3) as u16;
            }
            let op_in = noise.bytes(129);
            let mut payload = noise.bytes(64);
            // NULs often enough that names parse and later fields get read.
            for b in payload.iter_mut() {
                if *b < 64 {
                    *b = 0;
                }
            }
            let _ = decode(&h, &op_in, &payload);
        }
    }

    fn written(write: impl FnOnce(&mut ReplyWriter<'_>) -> bool) -> Vec<u8> {
        let mut buf = vec![0xee; 4096];
        let mut w = ReplyWriter::new(&mut buf);
        assert!(write(&mut w), "fits");
        let n = w.len();
        buf.truncate(n);
        buf
    }

    fn field32(b: &[u8], at: usize) -> u32 {
        u32_at(b, at).unwrap()
    }

    fn field64(b: &[u8], at: usize) -> u64 {
        u64_at(b, at).unwrap()
    }

    fn sample_attr() -> FileAttr {
        FileAttr {
            ino: INodeNo(0x1234),
            size: 5000,
            blocks: 16,
            atime: UNIX_EPOCH + Duration::new(1_700_000_000, 5),
            mtime: UNIX_EPOCH - Duration::new(1, 200_000_000),
            ctime: UNIX_EPOCH - Duration::from_secs(3),
            crtime: UNIX_EPOCH + Duration::from_secs(99),
            kind: FileType::Symlink,
            perm: 0o777,
            nlink: 2,
            uid: 1000,
            gid: 100,
            rdev: 0x0801,
            blksize: 4096,
            flags: 7,
        }
    }

    /// The `fuse_attr` at `at` is sample_attr's, field by field at the uapi offsets.
    fn assert_sample_attr(b: &[u8], at: usize) {
        assert_eq!(field64(b, at), 0x1234, "ino");
        assert_eq!(field64(b, at + 8), 5000, "size");
        assert_eq!(field64(b, at + 16), 16, "blocks");
        assert_eq!(field64(b, at + 24) as i64, 1_700_000_000, "atime");
        // 1.2 s before the epoch: -2 s + 0.8 s.
        assert_eq!(field64(b, at + 32) as i64, -2, "mtime");
        assert_eq!(field64(b, at + 40) as i64, -3, "ctime");
        assert_eq!(field32(b, at + 48), 5, "atimensec");
        assert_eq!(field32(b, at + 52), 800_000_000, "mtimensec");
        assert_eq!(field32(b, at + 56), 0, "ctimensec");
        assert_eq!(field32(b, at + 60), 0o120777, "mode");
        assert_eq!(field32(b, at + 64), 2, "nlink");
        assert_eq!(field32(b, at + 68), 1000, "uid");
        assert_eq!(field32(b, at + 72), 100, "gid");
        assert_eq!(field32(b, at + 76), 0x0801, "rdev");
        assert_eq!(field32(b, at + 80), 4096, "blksize");
        assert_eq!(field32(b, at + 84), 0, "flags: none from fuser on Linux");
    }

    const TTL: Duration = Duration::new(1, 500_000_000);

    #[test]
    fn entry_out() {
        let b = written(|w| w.entry(&sample_attr(), TTL, 77));
        assert_eq!(b.len(), 128);
        assert_eq!(field64(&b, 0), 0x1234, "nodeid: the attributes' inode");
        assert_eq!(field64(&b, 8), 77, "generation");
        assert_eq!(field64(&b, 16), 1, "entry_valid");
        assert_eq!(field64(&b, 24), 1, "attr_valid");
        assert_eq!(field32(&b, 32), 500_000_000, "entry_valid_nsec");
        assert_eq!(field32(&b, 36), 500_000_000, "attr_valid_nsec");
        assert_sample_attr(&b, 40);
    }

    #[test]
    fn attr_out() {
        let b = written(|w| w.attr(&sample_attr(), Duration::new(3, 7)));
        assert_eq!(b.len(), 104);
        assert_eq!(field64(&b, 0), 3, "attr_valid");
        assert_eq!(field32(&b, 8), 7, "attr_valid_nsec");
        assert_eq!(field32(&b, 12), 0, "dummy");
        assert_sample_attr(&b, 16);
    }

    #[test]
    fn open_out() {
        let b = written(|w| w.open(0xfeed, 1 << 7 | 1 << 1, 5));
        assert_eq!(b.len(), 16);
        assert_eq!(field64(&b, 0), 0xfeed, "fh");
        assert_eq!(field32(&b, 8), 1 << 7 | 1 << 1, "open_flags");
        assert_eq!(field32(&b, 12), 5, "backing_id");
        let b = written(|w| w.open(1, 0, -1));
        assert_eq!(field32(&b, 12), u32::MAX, "backing_id is an int32");
    }

    #[test]
    fn create_out() {
        let b = written(|w| w.create(&sample_attr(), TTL, 3, 0xf00, 2, 0));
        assert_eq!(b.len(), 144);
        assert_eq!(field64(&b, 0), 0x1234, "nodeid");
        assert_eq!(field64(&b, 8), 3, "generation");
        assert_eq!(field64(&b, 16), 1, "entry_valid");
        assert_eq!(field64(&b, 24), 1, "attr_valid");
        assert_eq!(field32(&b, 32), 500_000_000, "entry_valid_nsec");
        assert_eq!(field32(&b, 36), 500_000_000, "attr_valid_nsec");
        assert_sample_attr(&b, 40);
        assert_eq!(field64(&b, 128), 0xf00, "fh");
        assert_eq!(field32(&b, 136), 2, "open_flags");
        assert_eq!(field32(&b, 140), 0, "backing_id");
    }

    #[test]
    fn small_outs() {
        let b = written(|w| w.write(4096));
        assert_eq!(b, Fields::default().u32(4096).u32(0).0, "fuse_write_out");
        let b = written(|w| w.xattr_size(321));
        assert_eq!(b, Fields::default().u32(321).u32(0).0, "fuse_getxattr_out");
        let b = written(|w| w.lseek(-9));
        assert_eq!(b, Fields::default().u64(-9i64 as u64).0, "fuse_lseek_out");
        let b = written(|w| w.data(b"target"));
        assert_eq!(b, b"target");
        let b = written(|w| w.data(b""));
        assert!(b.is_empty());
    }

    #[test]
    fn statfs_out() {
        let b = written(|w| w.statfs(&STATFS));
        assert_eq!(b.len(), 80);
        for (i, v) in [1, 2, 3, 4, 5].into_iter().enumerate() {
            assert_eq!(field64(&b, i * 8), v, "u64 field {i}");
        }
        assert_eq!(field32(&b, 40), 6, "bsize");
        assert_eq!(field32(&b, 44), 7, "namelen");
        assert_eq!(field32(&b, 48), 8, "frsize");
        assert_eq!(&b[52..], &[0; 28], "padding and spare");
    }

    #[test]
    fn ioctl_out() {
        let b = written(|w| w.ioctl(0, &[9, 8, 7, 6]));
        assert_eq!(b.len(), 20);
        assert_eq!(field32(&b, 0) as i32, 0, "result");
        assert_eq!(field32(&b, 4), 0, "flags");
        assert_eq!(field32(&b, 8), 1, "in_iovs, as fuser sends");
        assert_eq!(field32(&b, 12), 1, "out_iovs, as fuser sends");
        assert_eq!(&b[16..], &[9, 8, 7, 6]);
        let b = written(|w| w.ioctl(-1, &[]));
        assert_eq!(b, Fields::default().u32(u32::MAX).u32(0).u32(1).u32(1).0);
    }

    #[test]
    fn out_header_fields() {
        let mut area = [0xee; 128];
        assert!(out_header(
            &mut area,
            0x0102_0304_0506_0708,
            -libc::ENOENT,
            0
        ));
        assert_eq!(field32(&area, 0), 16, "len: the header alone");
        assert_eq!(field32(&area, 4) as i32, -libc::ENOENT, "error");
        assert_eq!(field64(&area, 8), 0x0102_0304_0506_0708, "unique");
        assert_eq!(&area[16..], &[0xee; 112], "nothing past the header");
        assert!(out_header(&mut area, 1, 0, 144));
        assert_eq!(field32(&area, 0), 160, "len: header and payload");
        let mut short = [0xee; 15];
        assert!(!out_header(&mut short, 1, 0, 0));
        assert_eq!(short, [0xee; 15]);
        let mut area = [0xee; 16];
        assert!(!out_header(&mut area, 1, 0, u32::MAX as usize));
        assert_eq!(area, [0xee; 16]);
    }

    #[test]
    fn reply_times_as_fuser_writes_them() {
        let before = |s: u64, n: u32| reply_time(&(UNIX_EPOCH - Duration::new(s, n)));
        assert_eq!(before(1, 0), (-1, 0));
        assert_eq!(before(0, 1), (-1, 999_999_999));
        assert_eq!(before(1, 200_000_000), (-2, 800_000_000));
        assert_eq!(reply_time(&UNIX_EPOCH), (0, 0));
        assert_eq!(reply_time(&(UNIX_EPOCH + Duration::new(5, 6))), (5, 6));
    }

    #[test]
    fn dirent_layout_and_type_bits() {
        let b = written(|w| w.dirent(4096, 0x55, 3, FileType::Directory, os("abc")));
        // 24 bytes of header, 3 of name, padded to 32.
        assert_eq!(b.len(), 32);
        assert_eq!(field64(&b, 0), 0x55, "ino");
        assert_eq!(field64(&b, 8), 3, "off");
        assert_eq!(field32(&b, 16), 3, "namelen");
        assert_eq!(field32(&b, 20), u32::from(libc::DT_DIR), "type");
        assert_eq!(&b[24..27], b"abc");
        assert_eq!(&b[27..], &[0; 5], "padding");
        for (kind, dt) in [
            (FileType::NamedPipe, libc::DT_FIFO),
            (FileType::CharDevice, libc::DT_CHR),
            (FileType::Directory, libc::DT_DIR),
            (FileType::BlockDevice, libc::DT_BLK),
            (FileType::RegularFile, libc::DT_REG),
            (FileType::Symlink, libc::DT_LNK),
            (FileType::Socket, libc::DT_SOCK),
        ] {
            let b = written(|w| w.dirent(4096, 1, 1, kind, os("12345678")));
            assert_eq!(b.len(), 32, "an 8-byte name needs no padding");
            assert_eq!(field32(&b, 20), u32::from(dt), "{kind:?}");
        }
        let b = written(|w| w.dirent(4096, 1, 1, FileType::RegularFile, os("")));
        assert_eq!(b.len(), 24);
    }

    #[test]
    fn dirents_stop_at_the_request_size() {
        let mut buf = vec![0xee; 4096];
        let mut w = ReplyWriter::new(&mut buf);
        assert!(!w.dirent(31, 1, 1, FileType::RegularFile, os("abc")));
        assert_eq!(w.len(), 0);
        assert!(w.dirent(40, 1, 1, FileType::RegularFile, os("abc")));
        assert!(!w.dirent(40, 2, 2, FileType::RegularFile, os("d")));
        assert!(w.dirent(64, 2, 2, FileType::RegularFile, os("d")));
        assert!(!w.direntplus(64 + 159, &sample_attr(), TTL, 0, 3, os("x")));
        assert!(w.direntplus(64 + 160, &sample_attr(), TTL, 0, 3, os("x")));
        assert_eq!(w.len(), 224);
        assert_eq!(&buf[224..], &[0xee; 4096 - 224][..], "nothing written past");
        // The buffer bounds the reply as the request's size does.
        let mut buf = vec![0xee; 31];
        let mut w = ReplyWriter::new(&mut buf);
        assert!(!w.dirent(4096, 1, 1, FileType::RegularFile, os("abc")));
        assert_eq!(w.len(), 0);
        assert_eq!(buf, [0xee; 31]);
    }

    #[test]
    fn direntplus_layout() {
        let b = written(|w| w.direntplus(4096, &sample_attr(), TTL, 9, 4, os("xyz")));
        // fuse_entry_out (128), fuse_dirent (24), 3 bytes of name, padded to 160.
        assert_eq!(b.len(), 160);
        assert_eq!(field64(&b, 0), 0x1234, "nodeid");
        assert_eq!(field64(&b, 8), 9, "generation");
        assert_eq!(field64(&b, 16), 1, "entry_valid");
        assert_eq!(field64(&b, 24), 1, "attr_valid");
        assert_eq!(field32(&b, 32), 500_000_000, "entry_valid_nsec");
        assert_eq!(field32(&b, 36), 500_000_000, "attr_valid_nsec");
        assert_sample_attr(&b, 40);
        assert_eq!(
            field64(&b, 128),
            0x1234,
            "dirent ino: the attributes' inode"
        );
        assert_eq!(field64(&b, 136), 4, "off");
        assert_eq!(field32(&b, 144), 3, "namelen");
        assert_eq!(field32(&b, 148), u32::from(libc::DT_LNK), "type");
        assert_eq!(&b[152..155], b"xyz");
        assert_eq!(&b[155..], &[0; 5], "padding");
        // The type is the mode's, permission bits above 0o7777 and all, as fuser
        // computes it.
        let mut odd = sample_attr();
        odd.kind = FileType::RegularFile;
        odd.perm = 0o10644;
        let b = written(|w| w.direntplus(4096, &odd, TTL, 0, 1, os("f")));
        assert_eq!(field32(&b, 148), (libc::S_IFREG | 0o10644) >> 12);
    }

    #[test]
    fn replies_that_do_not_fit_write_nothing() {
        let attr = sample_attr();
        let name = os("name");
        type Write<'t> = Box<dyn Fn(&mut ReplyWriter<'_>) -> bool + 't>;
        let replies: Vec<(usize, Write<'_>)> = vec![
            (128, Box::new(|w| w.entry(&attr, TTL, 0))),
            (104, Box::new(|w| w.attr(&attr, TTL))),
            (16, Box::new(|w| w.open(1, 0, 0))),
            (144, Box::new(|w| w.create(&attr, TTL, 0, 1, 0, 0))),
            (8, Box::new(|w| w.write(1))),
            (80, Box::new(|w| w.statfs(&STATFS))),
            (8, Box::new(|w| w.xattr_size(1))),
            (5, Box::new(|w| w.data(b"12345"))),
            (19, Box::new(|w| w.ioctl(0, b"abc"))),
            (8, Box::new(|w| w.lseek(1))),
            (
                32,
                Box::new(|w| w.dirent(4096, 1, 1, FileType::Socket, name)),
            ),
            (
                160,
                Box::new(|w| w.direntplus(4096, &attr, TTL, 0, 1, name)),
            ),
        ];
        for (i, (need, write)) in replies.iter().enumerate() {
            for room in 0..*need {
                let mut buf = vec![0xee; room];
                let mut w = ReplyWriter::new(&mut buf);
                assert!(!write(&mut w), "reply {i} in {room} bytes");
                assert_eq!(w.len(), 0);
                assert!(
                    buf.iter().all(|&b| b == 0xee),
                    "reply {i}: buffer untouched"
                );
            }
            let mut buf = vec![0xee; *need];
            let mut w = ReplyWriter::new(&mut buf);
            assert!(write(&mut w), "reply {i} in {need} bytes");
            assert_eq!(w.len(), *need);
            // Appended after what is there, within the same limits.
            let mut buf = vec![0xee; *need + 3];
            let mut w = ReplyWriter::new(&mut buf);
            assert!(w.data(b"abc"));
            assert!(write(&mut w), "reply {i} after 3 bytes");
            assert!(!write(&mut w), "reply {i} a second time");
            assert_eq!(w.len(), *need + 3);
        }
    }

    /// fuser 0.18 itself, serving a scripted filesystem over a datagram socket
    /// (which keeps message boundaries as /dev/fuse does), is the reference: each
    /// request is sent to it in the /dev/fuse layout and decoded here from the ring
    /// layout, and both the arguments its callback received and the reply it wrote
    /// must be what `decode` and `ReplyWriter` make of the same bytes.
    mod fuser_parity {
        use std::os::unix::net::UnixDatagram;
        use std::sync::{Arc, Mutex};

        use fuser::{
            Filesystem, FopenFlags, Generation, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
            ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen,
            ReplyStatfs, ReplyWrite, ReplyXattr, Request, SessionACL,
        };

        use super::*;

        /// What each callback was called with, as the `Op` it stands for.
        type Calls = Arc<Mutex<Vec<String>>>;

        struct Scripted(Calls);

        impl Scripted {
            fn saw(&self, op: Op<'_>) {
                self.0.lock().unwrap().push(format!("{op:?}"));
            }
        }

        const KEEP: FopenFlags = FopenFlags::FOPEN_KEEP_CACHE;

        fn listing() -> [(FileType, &'static str); 3] {
            [
                (FileType::Directory, "sub"),
                (FileType::RegularFile, "file.txt"),
                (FileType::Symlink, "l"),
            ]
        }

        impl Filesystem for Scripted {
            fn lookup(&self, _: &Request, _: INodeNo, name: &OsStr, reply: ReplyEntry) {
                self.saw(Op::Lookup { name });
                reply.entry(&TTL, &sample_attr(), Generation(77));
            }
            fn getattr(&self, _: &Request, _: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
                self.saw(Op::Getattr { fh });
                reply.attr(&Duration::new(3, 7), &sample_attr());
            }
            fn setattr(
                &self,
                _: &Request,
                _: INodeNo,
                mode: Option<u32>,
                uid: Option<u32>,
                gid: Option<u32>,
                size: Option<u64>,
                atime: Option<TimeOrNow>,
                mtime: Option<TimeOrNow>,
                ctime: Option<SystemTime>,
                fh: Option<FileHandle>,
                crtime: Option<SystemTime>,
                chgtime: Option<SystemTime>,
                bkuptime: Option<SystemTime>,
                flags: Option<fuser::BsdFileFlags>,
                reply: ReplyAttr,
            ) {
                assert!(crtime.is_none() && chgtime.is_none() && bkuptime.is_none());
                assert!(flags.is_none());
                self.saw(Op::Setattr {
                    mode,
                    uid,
                    gid,
                    size,
                    atime,
                    mtime,
                    ctime,
                    fh,
                });
                reply.attr(&TTL, &sample_attr());
            }
            fn readlink(&self, _: &Request, _: INodeNo, reply: ReplyData) {
                self.saw(Op::Readlink);
                reply.data(b"../target");
            }
            fn mknod(
                &self,
                _: &Request,
                _: INodeNo,
                name: &OsStr,
                mode: u32,
                umask: u32,
                rdev: u32,
                reply: ReplyEntry,
            ) {
                self.saw(Op::Mknod {
                    name,
                    mode,
                    umask,
                    rdev,
                });
                reply.entry(&TTL, &sample_attr(), Generation(0));
            }
            fn mkdir(
                &self,
                _: &Request,
                _: INodeNo,
                name: &OsStr,
                mode: u32,
                umask: u32,
                reply: ReplyEntry,
            ) {
                self.saw(Op::Mkdir { name, mode, umask });
                reply.entry(&TTL, &sample_attr(), Generation(0));
            }
            fn unlink(&self, _: &Request, _: INodeNo, name: &OsStr, reply: ReplyEmpty) {
                self.saw(Op::Unlink { name });
                reply.error(Errno::ENOENT);
            }
            fn rmdir(&self, _: &Request, _: INodeNo, name: &OsStr, reply: ReplyEmpty) {
                self.saw(Op::Rmdir { name });
                reply.ok();
            }
            fn symlink(
                &self,
                _: &Request,
                _: INodeNo,
                link_name: &OsStr,
                target: &Path,
                reply: ReplyEntry,
            ) {
                self.saw(Op::Symlink { link_name, target });
                reply.entry(&TTL, &sample_attr(), Generation(0));
            }
            fn rename(
                &self,
                _: &Request,
                _: INodeNo,
                name: &OsStr,
                newparent: INodeNo,
                newname: &OsStr,
                flags: RenameFlags,
                reply: ReplyEmpty,
            ) {
                self.saw(Op::Rename {
                    name,
                    newparent,
                    newname,
                    flags,
                });
                reply.ok();
            }
            fn link(
                &self,
                _: &Request,
                ino: INodeNo,
                _: INodeNo,
                newname: &OsStr,
                reply: ReplyEntry,
            ) {
                self.saw(Op::Link { ino, newname });
                reply.entry(&TTL, &sample_attr(), Generation(0));
            }
            fn open(&self, _: &Request, _: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
                self.saw(Op::Open { flags });
                reply.opened(FileHandle(0xfeed), KEEP);
            }
            fn read(
                &self,
                _: &Request,
                _: INodeNo,
                fh: FileHandle,
                offset: u64,
                size: u32,
                flags: OpenFlags,
                lock_owner: Option<LockOwner>,
                reply: ReplyData,
            ) {
                self.saw(Op::Read {
                    fh,
                    offset,
                    size,
                    flags,
                    lock_owner,
                });
                reply.data(b"some data");
            }
            fn write(
                &self,
                _: &Request,
                _: INodeNo,
                fh: FileHandle,
                offset: u64,
                data: &[u8],
                write_flags: WriteFlags,
                flags: OpenFlags,
                lock_owner: Option<LockOwner>,
                reply: ReplyWrite,
            ) {
                self.saw(Op::Write {
                    fh,
                    offset,
                    data,
                    write_flags,
                    flags,
                    lock_owner,
                });
                reply.written(data.len() as u32);
            }
            fn flush(
                &self,
                _: &Request,
                _: INodeNo,
                fh: FileHandle,
                lock_owner: LockOwner,
                reply: ReplyEmpty,
            ) {
                self.saw(Op::Flush { fh, lock_owner });
                reply.ok();
            }
            fn release(
                &self,
                _: &Request,
                _: INodeNo,
                fh: FileHandle,
                flags: OpenFlags,
                lock_owner: Option<LockOwner>,
                flush: bool,
                reply: ReplyEmpty,
            ) {
                self.saw(Op::Release {
                    fh,
                    flags,
                    lock_owner,
                    flush,
                });
                reply.ok();
            }
            fn fsync(
                &self,
                _: &Request,
                _: INodeNo,
                fh: FileHandle,
                datasync: bool,
                reply: ReplyEmpty,
            ) {
                self.saw(Op::Fsync { fh, datasync });
                reply.ok();
            }
            fn opendir(&self, _: &Request, _: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
                self.saw(Op::Opendir { flags });
                reply.opened(FileHandle(0xd1), FopenFlags::FOPEN_CACHE_DIR | KEEP);
            }
            fn readdir(
                &self,
                _: &Request,
                _: INodeNo,
                fh: FileHandle,
                offset: u64,
                mut reply: ReplyDirectory,
            ) {
                // fuser does not pass the size on; the listing shows it.
                self.saw(Op::Readdir {
                    fh,
                    offset,
                    size: 0,
                });
                for (i, (kind, name)) in listing().into_iter().enumerate() {
                    if reply.add(INodeNo(10 + i as u64), i as u64 + 1, kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            fn readdirplus(
                &self,
                _: &Request,
                _: INodeNo,
                fh: FileHandle,
                offset: u64,
                mut reply: ReplyDirectoryPlus,
            ) {
                self.saw(Op::Readdirplus {
                    fh,
                    offset,
                    size: 0,
                });
                for (i, (kind, name)) in listing().into_iter().enumerate() {
                    let attr = entry_attr(i, kind);
                    if reply.add(INodeNo(999), i as u64 + 1, name, &TTL, &attr, Generation(5)) {
                        break;
                    }
                }
                reply.ok();
            }
            fn releasedir(
                &self,
                _: &Request,
                _: INodeNo,
                fh: FileHandle,
                flags: OpenFlags,
                reply: ReplyEmpty,
            ) {
                self.saw(Op::Releasedir { fh, flags });
                reply.ok();
            }
            fn fsyncdir(
                &self,
                _: &Request,
                _: INodeNo,
                fh: FileHandle,
                datasync: bool,
                reply: ReplyEmpty,
            ) {
                self.saw(Op::Fsyncdir { fh, datasync });
                reply.ok();
            }
            fn statfs(&self, _: &Request, _: INodeNo, reply: ReplyStatfs) {
                self.saw(Op::Statfs);
                reply.statfs(1, 2, 3, 4, 5, 6, 7, 8);
            }
            fn setxattr(
                &self,
                _: &Request,
                _: INodeNo,
                name: &OsStr,
                value: &[u8],
                flags: i32,
                position: u32,
                reply: ReplyEmpty,
            ) {
                assert_eq!(position, 0);
                self.saw(Op::Setxattr { name, value, flags });
                reply.ok();
            }
            fn getxattr(
                &self,
                _: &Request,
                _: INodeNo,
                name: &OsStr,
                size: u32,
                reply: ReplyXattr,
            ) {
                self.saw(Op::Getxattr { name, size });
                match size {
                    0 => reply.size(5),
                    _ => reply.data(b"value"),
                }
            }
            fn listxattr(&self, _: &Request, _: INodeNo, size: u32, reply: ReplyXattr) {
                self.saw(Op::Listxattr { size });
                match size {
                    0 => reply.size(9),
                    _ => reply.data(b"user.a\0b\0"),
                }
            }
            fn removexattr(&self, _: &Request, _: INodeNo, name: &OsStr, reply: ReplyEmpty) {
                self.saw(Op::Removexattr { name });
                reply.ok();
            }
            fn access(&self, _: &Request, _: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
                self.saw(Op::Access { mask });
                reply.ok();
            }
            fn create(
                &self,
                _: &Request,
                _: INodeNo,
                name: &OsStr,
                mode: u32,
                umask: u32,
                flags: i32,
                reply: ReplyCreate,
            ) {
                self.saw(Op::Create {
                    name,
                    mode,
                    umask,
                    flags,
                });
                reply.created(&TTL, &sample_attr(), Generation(3), FileHandle(0xf00), KEEP);
            }
            fn ioctl(
                &self,
                _: &Request,
                _: INodeNo,
                fh: FileHandle,
                flags: IoctlFlags,
                cmd: u32,
                in_data: &[u8],
                out_size: u32,
                reply: ReplyIoctl,
            ) {
                self.saw(Op::Ioctl {
                    fh,
                    flags,
                    cmd,
                    in_data,
                    out_size,
                });
                reply.ioctl(0, &[9, 8, 7, 6]);
            }
            fn fallocate(
                &self,
                _: &Request,
                _: INodeNo,
                fh: FileHandle,
                offset: u64,
                length: u64,
                mode: i32,
                reply: ReplyEmpty,
            ) {
                self.saw(Op::Fallocate {
                    fh,
                    offset,
                    length,
                    mode,
                });
                reply.ok();
            }
            fn lseek(
                &self,
                _: &Request,
                _: INodeNo,
                fh: FileHandle,
                offset: i64,
                whence: i32,
                reply: ReplyLseek,
            ) {
                self.saw(Op::Lseek { fh, offset, whence });
                reply.offset(-9);
            }
            fn copy_file_range(
                &self,
                _: &Request,
                _: INodeNo,
                fh_in: FileHandle,
                offset_in: u64,
                ino_out: INodeNo,
                fh_out: FileHandle,
                offset_out: u64,
                len: u64,
                flags: CopyFileRangeFlags,
                reply: ReplyWrite,
            ) {
                self.saw(Op::CopyFileRange {
                    fh_in,
                    offset_in,
                    ino_out,
                    fh_out,
                    offset_out,
                    len,
                    flags,
                });
                reply.written(7);
            }
        }

        fn entry_attr(i: usize, kind: FileType) -> FileAttr {
            FileAttr {
                ino: INodeNo(20 + i as u64),
                kind,
                perm: 0o640,
                ..sample_attr()
            }
        }

        /// A request in the /dev/fuse layout.
        fn dev_request(opcode: u32, unique: u64, arg0: &[u8], payload: &[u8]) -> Vec<u8> {
            let len = 40 + arg0.len() + payload.len();
            let mut r = Fields::default()
                .u32(len as u32)
                .u32(opcode)
                .u64(unique)
                .u64(1)
                .u32(0)
                .u32(0)
                .u32(1)
                .u32(0)
                .0;
            r.extend_from_slice(arg0);
            r.extend_from_slice(payload);
            r
        }

        fn recv(sock: &UnixDatagram) -> Vec<u8> {
            let mut buf = vec![0; 1 << 16];
            let n = sock.recv(&mut buf).expect("a reply from fuser");
            buf.truncate(n);
            buf
        }

        /// One request: its opcode, first argument and payload, and the reply
        /// payload `ReplyWriter` makes of what the scripted filesystem answers
        /// (`None`: an error, ENOENT).
        struct Case {
            opcode: u32,
            arg0: Vec<u8>,
            payload: Vec<u8>,
            reply: Option<Vec<u8>>,
        }

        fn ours(write: impl FnOnce(&mut ReplyWriter<'_>) -> bool) -> Option<Vec<u8>> {
            Some(written(write))
        }

        fn cases() -> Vec<Case> {
            let attr = sample_attr();
            let keep = KEEP.bits();
            let case = |opcode, arg0: Fields, payload: &[u8], reply| Case {
                opcode,
                arg0: arg0.0,
                payload: payload.to_vec(),
                reply,
            };
            let none = Fields::default;
            let entry = || ours(|w| w.entry(&attr, TTL, 0));
            let empty = || Some(vec![]);
            let rel = |flags: u32| Fields::default().u64(8).u32(0o2).u32(flags).u64(31);
            let fsync = |flags: u32| Fields::default().u64(4).u32(flags).u32(0);
            let xattr_in = |size: u32| Fields::default().u32(size).u32(0);
            let listing_of = |max: usize| {
                ours(|w| {
                    for (i, (kind, name)) in listing().into_iter().enumerate() {
                        let ino = 10 + i as u64;
                        if !w.dirent(max, ino, i as u64 + 1, kind, os(name)) {
                            break;
                        }
                    }
                    true
                })
            };
            let plus_listing_of = |max: usize| {
                ours(|w| {
                    for (i, (kind, name)) in listing().into_iter().enumerate() {
                        let attr = entry_attr(i, kind);
                        if !w.direntplus(max, &attr, TTL, 5, i as u64 + 1, os(name)) {
                            break;
                        }
                    }
                    true
                })
            };
            vec![
                case(
                    opcode::LOOKUP,
                    none(),
                    b"name\0",
                    ours(|w| w.entry(&attr, TTL, 77)),
                ),
                case(
                    opcode::GETATTR,
                    Fields::default().u32(1).u32(0).u64(77),
                    b"",
                    ours(|w| w.attr(&attr, Duration::new(3, 7))),
                ),
                case(
                    opcode::GETATTR,
                    Fields::default().u32(0).u32(0).u64(77),
                    b"",
                    ours(|w| w.attr(&attr, Duration::new(3, 7))),
                ),
                case(
                    opcode::SETATTR,
                    setattr_in(0x7f | 1 << 9 | 1 << 10 | 1 << 11, 1_000_000_000, 100),
                    b"",
                    ours(|w| w.attr(&attr, TTL)),
                ),
                case(
                    opcode::SETATTR,
                    setattr_in(1 << 4 | 1 << 5 | 1 << 8, -2, 300_000_000),
                    b"",
                    ours(|w| w.attr(&attr, TTL)),
                ),
                case(
                    opcode::READLINK,
                    none(),
                    b"",
                    ours(|w| w.data(b"../target")),
                ),
                case(opcode::SYMLINK, none(), b"link\0../t\0", entry()),
                case(
                    opcode::MKNOD,
                    Fields::default().u32(0o20644).u32(0x0801).u32(0o022).u32(0),
                    b"dev\0",
                    entry(),
                ),
                case(
                    opcode::MKDIR,
                    Fields::default().u32(0o755).u32(0o027),
                    b"d\0",
                    entry(),
                ),
                case(opcode::UNLINK, none(), b"gone\0", None),
                case(opcode::RMDIR, none(), b"dir\0", empty()),
                case(
                    opcode::RENAME,
                    Fields::default().u64(12),
                    b"old\0new\0",
                    empty(),
                ),
                case(
                    opcode::RENAME2,
                    Fields::default().u64(13).u32(libc::RENAME_NOREPLACE).u32(0),
                    b"a\0b\0",
                    empty(),
                ),
                case(opcode::LINK, Fields::default().u64(99), b"hard\0", entry()),
                case(
                    opcode::OPEN,
                    Fields::default().u32(0o1000002).u32(0),
                    b"",
                    ours(|w| w.open(0xfeed, keep, 0)),
                ),
                case(
                    opcode::READ,
                    io_in(8192, 4096, 2),
                    b"",
                    ours(|w| w.data(b"some data")),
                ),
                case(
                    opcode::WRITE,
                    io_in(10, 3, 2 | 4),
                    b"abc",
                    ours(|w| w.write(3)),
                ),
                case(opcode::STATFS, none(), b"", ours(|w| w.statfs(&STATFS))),
                case(opcode::RELEASE, rel(3), b"", empty()),
                case(opcode::RELEASE, rel(0), b"", empty()),
                case(opcode::FSYNC, fsync(1), b"", empty()),
                case(
                    opcode::SETXATTR,
                    Fields::default().u32(3).u32(libc::XATTR_REPLACE as u32),
                    b"user.k\0v\0w",
                    empty(),
                ),
                case(
                    opcode::GETXATTR,
                    xattr_in(0),
                    b"user.k\0",
                    ours(|w| w.xattr_size(5)),
                ),
                case(
                    opcode::GETXATTR,
                    xattr_in(64),
                    b"user.k\0",
                    ours(|w| w.data(b"value")),
                ),
                case(
                    opcode::LISTXATTR,
                    xattr_in(0),
                    b"",
                    ours(|w| w.xattr_size(9)),
                ),
                case(
                    opcode::LISTXATTR,
                    xattr_in(64),
                    b"",
                    ours(|w| w.data(b"user.a\0b\0")),
                ),
                case(opcode::REMOVEXATTR, none(), b"user.k\0", empty()),
                case(
                    opcode::FLUSH,
                    Fields::default().u64(6).u32(0).u32(0).u64(0x55),
                    b"",
                    empty(),
                ),
                case(
                    opcode::OPENDIR,
                    Fields::default().u32(0o200000).u32(0),
                    b"",
                    ours(|w| w.open(0xd1, (FopenFlags::FOPEN_CACHE_DIR | KEEP).bits(), 0)),
                ),
                // Room for two of the three 32-byte entries.
                case(opcode::READDIR, io_in(0, 80, 0), b"", listing_of(80)),
                case(opcode::READDIR, io_in(0, 4096, 0), b"", listing_of(4096)),
                case(opcode::RELEASEDIR, rel(0), b"", empty()),
                case(opcode::FSYNCDIR, fsync(0), b"", empty()),
                case(
                    opcode::ACCESS,
                    Fields::default().u32(libc::W_OK as u32).u32(0),
                    b"",
                    empty(),
                ),
                case(
                    opcode::CREATE,
                    Fields::default()
                        .u32(0o101101)
                        .u32(0o100600)
                        .u32(0o002)
                        .u32(0),
                    b"f\0",
                    ours(|w| w.create(&attr, TTL, 3, 0xf00, keep, 0)),
                ),
                case(
                    opcode::IOCTL,
                    ioctl_in(16, 4),
                    &[1, 2, 3, 4],
                    ours(|w| w.ioctl(0, &[9, 8, 7, 6])),
                ),
                case(
                    opcode::FALLOCATE,
                    Fields::default().u64(2).u64(100).u64(200).u32(1).u32(0),
                    b"",
                    empty(),
                ),
                // Room for two of the three 160-byte entries.
                case(
                    opcode::READDIRPLUS,
                    io_in(0, 400, 0),
                    b"",
                    plus_listing_of(400),
                ),
                case(
                    opcode::LSEEK,
                    Fields::default().u64(9).u64(-5i64 as u64).u32(3).u32(0),
                    b"",
                    ours(|w| w.lseek(-9)),
                ),
                case(
                    opcode::COPY_FILE_RANGE,
                    Fields::default()
                        .u64(1)
                        .u64(10)
                        .u64(50)
                        .u64(2)
                        .u64(20)
                        .u64(1 << 20)
                        .u64(0),
                    b"",
                    ours(|w| w.write(7)),
                ),
            ]
        }

        /// What the callback saw: the decoded op, with the directory size fuser
        /// does not pass on set to 0.
        fn as_seen(op: Op<'_>) -> String {
            let op = match op {
                Op::Readdir { fh, offset, .. } => Op::Readdir {
                    fh,
                    offset,
                    size: 0,
                },
                Op::Readdirplus { fh, offset, .. } => Op::Readdirplus {
                    fh,
                    offset,
                    size: 0,
                },
                other => other,
            };
            format!("{op:?}")
        }

        #[test]
        fn decode_and_replies_match_fuser() {
            let (sock, theirs) = UnixDatagram::pair().unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            // FUSE_INIT: major 7, minor 40, no readahead, FUSE_INIT_EXT, then flags2
            // and the unused words of fuse_init_in.
            let mut init_in = Fields::default()
                .u32(7)
                .u32(40)
                .u32(0)
                .u32(1 << 30)
                .u32(0)
                .0;
            init_in.resize(64, 0);
            sock.send(&dev_request(26, 1, &init_in, &[])).unwrap();
            let calls = Calls::default();
            let mut config = fuser::Config::default();
            config.n_threads = Some(1);
            let session = fuser::Session::from_fd(
                Scripted(calls.clone()),
                theirs.into(),
                SessionACL::All,
                config,
            )
            .unwrap();
            let init_out = recv(&sock);
            assert_eq!(field32(&init_out, 4), 0, "INIT answered without error");
            let served = std::thread::spawn(move || session.run());

            for (i, c) in cases().into_iter().enumerate() {
                let unique = 2 * i as u64 + 10;
                sock.send(&dev_request(c.opcode, unique, &c.arg0, &c.payload))
                    .unwrap();
                let theirs = recv(&sock);

                let h =
                    InHeader::parse(&dev_request(c.opcode, unique, &c.arg0, &c.payload)).unwrap();
                let area = op_in(&Fields(c.arg0.clone()));
                let op = decode(&h, &area, &c.payload).expect("decodes");
                let seen = calls.lock().unwrap().pop();
                assert_eq!(seen, Some(as_seen(op)), "case {i}: opcode {}", c.opcode);

                let (error, payload) = match c.reply {
                    Some(p) => (0, p),
                    None => (-libc::ENOENT, vec![]),
                };
                let mut header = [0; 16];
                assert!(out_header(&mut header, unique, error, payload.len()));
                assert_eq!(&theirs[..16], &header, "case {i}: out header");
                assert_eq!(&theirs[16..], &payload[..], "case {i}: reply payload");
            }

            sock.send(&dev_request(opcode::DESTROY, 1000, &[], &[]))
                .unwrap();
            recv(&sock);
            served.join().unwrap().unwrap();
        }
    }
}
