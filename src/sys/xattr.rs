//! Extended attributes of layer entries. Entries are named by (directory fd, one
//! component); Linux has no fd-relative xattr calls before 6.13, so the entry is
//! reached as `/proc/self/fd/DIR/NAME` with the l* variants: the directory magic
//! link is exact and the final component is never followed.

use std::ffi::{OsStr, OsString};
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStringExt;

use rustix::fs::XattrFlags;

use super::fs::proc_fd_path;
use super::{Errno, SysResult};

/// Where an xattr call goes: an entry in a directory, or the object behind an fd
/// (O_PATH included) itself.
#[derive(Clone, Copy)]
pub enum Target<'a> {
    Entry(BorrowedFd<'a>, &'a OsStr),
    Fd(BorrowedFd<'a>),
}

fn with_path<T>(
    target: Target<'_>,
    f: impl FnOnce(&std::ffi::CStr, bool) -> SysResult<T>,
) -> SysResult<T> {
    match target {
        Target::Entry(dir, name) => {
            super::fs::check_component(name)?;
            let mut bytes = proc_fd_path(dir).into_bytes();
            bytes.push(b'/');
            bytes.extend_from_slice(std::os::unix::ffi::OsStrExt::as_bytes(name));
            let path = std::ffi::CString::new(bytes).map_err(|_| Errno::INVAL)?;
            f(&path, false)
        }
        // The magic link itself must be followed to reach the object.
        Target::Fd(fd) => f(&proc_fd_path(fd), true),
    }
}

pub fn get(target: Target<'_>, name: &OsStr) -> SysResult<Vec<u8>> {
    with_path(target, |path, follow| {
        let query = || {
            if follow {
                rustix::fs::getxattr_query(path, name)
            } else {
                rustix::fs::lgetxattr_query(path, name)
            }
        };
        let read = |buf: &mut [u8]| {
            if follow {
                rustix::fs::getxattr(path, name, buf)
            } else {
                rustix::fs::lgetxattr(path, name, buf)
            }
        };
        // The value may grow between the size query and the read: retry on ERANGE.
        for _ in 0..4 {
            let size = query()?;
            let mut buf = vec![0u8; size];
            match read(&mut buf) {
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(buf);
                }
                Err(Errno::RANGE) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Errno::RANGE)
    })
}

/// Reads a value known to be short (markers, numbers, paths) with one syscall;
/// `None` when the attribute is absent or the filesystem has none. Longer values
/// fall back to [`get`].
pub fn get_small(target: Target<'_>, name: &OsStr) -> SysResult<Option<Vec<u8>>> {
    let mut buf = [0u8; 256];
    let res = with_path(target, |path, follow| {
        if follow {
            rustix::fs::getxattr(path, name, &mut buf[..])
        } else {
            rustix::fs::lgetxattr(path, name, &mut buf[..])
        }
    });
    match res {
        Ok(n) => Ok(Some(buf[..n].to_vec())),
        Err(Errno::NODATA) | Err(Errno::OPNOTSUPP) => Ok(None),
        Err(Errno::RANGE) => get(target, name).map(Some),
        Err(e) => Err(e),
    }
}

/// Whether the attribute exists (without reading it).
pub fn exists(target: Target<'_>, name: &OsStr) -> SysResult<bool> {
    let res = with_path(target, |path, follow| {
        if follow {
            rustix::fs::getxattr_query(path, name)
        } else {
            rustix::fs::lgetxattr_query(path, name)
        }
    });
    match res {
        Ok(_) | Err(Errno::RANGE) => Ok(true),
        Err(Errno::NODATA) | Err(Errno::OPNOTSUPP) => Ok(false),
        Err(e) => Err(e),
    }
}

pub fn list(target: Target<'_>) -> SysResult<Vec<OsString>> {
    with_path(target, |path, follow| {
        let mut size = 1024;
        loop {
            let mut buf = vec![0u8; size];
            let res = if follow {
                rustix::fs::listxattr(path, &mut buf[..])
            } else {
                rustix::fs::llistxattr(path, &mut buf[..])
            };
            match res {
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(buf
                        .split(|b| *b == 0)
                        .filter(|s| !s.is_empty())
                        .map(|s| OsString::from_vec(s.to_vec()))
                        .collect());
                }
                Err(Errno::RANGE) if size < 1 << 22 => size *= 8,
                Err(Errno::OPNOTSUPP) => return Ok(Vec::new()),
                Err(e) => return Err(e),
            }
        }
    })
}

/// `flags` as in setxattr(2): XATTR_CREATE / XATTR_REPLACE.
pub fn set(target: Target<'_>, name: &OsStr, value: &[u8], flags: i32) -> SysResult<()> {
    let flags = XattrFlags::from_bits_retain(flags as u32);
    with_path(target, |path, follow| {
        if follow {
            rustix::fs::setxattr(path, name, value, flags)
        } else {
            rustix::fs::lsetxattr(path, name, value, flags)
        }
    })
}

pub fn remove(target: Target<'_>, name: &OsStr) -> SysResult<()> {
    with_path(target, |path, follow| {
        if follow {
            rustix::fs::removexattr(path, name)
        } else {
            rustix::fs::lremovexattr(path, name)
        }
    })
}
