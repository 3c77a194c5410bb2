//! Directory-fd-relative calls newer than rustix's wrappers: fchmodat2 (Linux 6.6)
//! and the *xattrat family (Linux 6.13). Each replaces a detour through
//! `/proc/self/fd/N` (an O_PATH open, a procfs path walk and a close), which costs
//! several microseconds on every chmod and every xattr request a build sends.
//!
//! Invariants:
//! - Every call here passes AT_SYMLINK_NOFOLLOW: the final component is never
//!   followed (`sys/mod.rs`).
//! - Whether the kernel has a call is probed once, with arguments that cannot touch
//!   anything; a kernel (or a seccomp filter) without it answers ENOSYS or EPERM
//!   there, and the callers then keep their procfs path. A real call's EPERM is
//!   never read as "missing": only the probe decides.

use std::ffi::{CString, OsStr};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::OnceLock;

use super::{Errno, SysResult};

// The generic syscall numbers, the same on every architecture since Linux 5.x.
const SYS_SETXATTRAT: libc::c_long = 463;
const SYS_GETXATTRAT: libc::c_long = 464;
const SYS_LISTXATTRAT: libc::c_long = 465;
const SYS_REMOVEXATTRAT: libc::c_long = 466;

/// `struct xattr_args` of the *xattrat calls.
#[repr(C)]
struct XattrArgs {
    value: u64,
    size: u32,
    flags: u32,
}

fn cstr(s: &OsStr) -> SysResult<CString> {
    CString::new(s.as_bytes()).map_err(|_| Errno::INVAL)
}

fn result(ret: libc::c_long) -> SysResult<usize> {
    if ret < 0 {
        Err(Errno::from_raw_os_error(super::process::errno()))
    } else {
        Ok(ret as usize)
    }
}

/// getxattrat or setxattrat (`nr`), which share one shape: (dirfd, path, at_flags,
/// name, args, sizeof args), the final component never followed.
///
/// # Safety
/// `args.value` must point to `args.size` bytes that stay valid for the call,
/// writable for getxattrat.
unsafe fn call_with_args(
    nr: libc::c_long,
    dirfd: libc::c_long,
    path: &std::ffi::CStr,
    xattr: &std::ffi::CStr,
    args: &mut XattrArgs,
) -> SysResult<usize> {
    // SAFETY: NUL-terminated strings, `args` is exactly the struct the size names,
    // and the caller vouches for the buffer it points to.
    let ret = unsafe {
        libc::syscall(
            nr,
            dirfd,
            path.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW as libc::c_long,
            xattr.as_ptr(),
            &raw mut *args,
            size_of::<XattrArgs>(),
        )
    };
    result(ret)
}

/// Whether the *xattrat calls exist here.
pub fn has_xattrat() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        let mut args = XattrArgs {
            value: 0,
            size: 0,
            flags: 0,
        };
        // A size query of an attribute no one sets, on "/": ENODATA, EOPNOTSUPP or a
        // size where the call exists.
        let fdcwd = libc::AT_FDCWD as libc::c_long;
        // SAFETY: a size query: `args` points to no buffer (size 0).
        let res = unsafe {
            call_with_args(
                SYS_GETXATTRAT,
                fdcwd,
                c"/",
                c"user.stratafs.probe",
                &mut args,
            )
        };
        !matches!(res, Err(Errno::NOSYS) | Err(Errno::PERM))
    })
}

/// Whether fchmodat2 exists here.
pub fn has_fchmodat2() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        // Flags it does not know: EINVAL before anything is looked up.
        // SAFETY: a NUL-terminated path; nothing is written.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_fchmodat2,
                libc::AT_FDCWD as libc::c_long,
                c"".as_ptr(),
                0 as libc::c_long,
                !0u32 as libc::c_long,
            )
        };
        !matches!(result(ret), Err(Errno::NOSYS) | Err(Errno::PERM))
    })
}

/// chmod of `dir`/`name` (or, with an empty name, of the object behind `dir`, O_PATH
/// included), never through a symlink: a symlink answers EOPNOTSUPP.
pub fn fchmodat2(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> SysResult<()> {
    let path = cstr(name)?;
    let mut flags = libc::AT_SYMLINK_NOFOLLOW;
    if name.is_empty() {
        flags |= libc::AT_EMPTY_PATH;
    }
    // SAFETY: a NUL-terminated path and plain integers.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_fchmodat2,
            dir.as_raw_fd() as libc::c_long,
            path.as_ptr(),
            (mode & 0o7777) as libc::c_long,
            flags as libc::c_long,
        )
    };
    result(ret).map(drop)
}

/// getxattr of `dir`/`name` into `buf`; an empty `buf` asks for the size only.
pub fn getxattrat(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    xattr: &OsStr,
    buf: &mut [u8],
) -> SysResult<usize> {
    let (path, xattr) = (cstr(name)?, cstr(xattr)?);
    let mut args = XattrArgs {
        value: buf.as_mut_ptr() as u64,
        size: u32::try_from(buf.len()).unwrap_or(u32::MAX),
        flags: 0,
    };
    let dirfd = dir.as_raw_fd() as libc::c_long;
    // SAFETY: `args` names `buf`, writable, with at most its length.
    unsafe { call_with_args(SYS_GETXATTRAT, dirfd, &path, &xattr, &mut args) }
}

/// listxattr of `dir`/`name` into `buf`; an empty `buf` asks for the size only.
pub fn listxattrat(dir: BorrowedFd<'_>, name: &OsStr, buf: &mut [u8]) -> SysResult<usize> {
    let path = cstr(name)?;
    // SAFETY: a NUL-terminated path; the kernel writes at most `buf.len()` bytes.
    let ret = unsafe {
        libc::syscall(
            SYS_LISTXATTRAT,
            dir.as_raw_fd() as libc::c_long,
            path.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW as libc::c_long,
            buf.as_mut_ptr(),
            buf.len(),
        )
    };
    result(ret)
}

/// setxattr of `dir`/`name`; `flags` as in setxattr(2).
pub fn setxattrat(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    xattr: &OsStr,
    value: &[u8],
    flags: u32,
) -> SysResult<()> {
    let (path, xattr) = (cstr(name)?, cstr(xattr)?);
    let mut args = XattrArgs {
        value: value.as_ptr() as u64,
        size: u32::try_from(value.len()).map_err(|_| Errno::TOOBIG)?,
        flags,
    };
    let dirfd = dir.as_raw_fd() as libc::c_long;
    // SAFETY: `args` names `value` with its length; setxattrat only reads it.
    unsafe { call_with_args(SYS_SETXATTRAT, dirfd, &path, &xattr, &mut args) }.map(drop)
}

/// removexattr of `dir`/`name`.
pub fn removexattrat(dir: BorrowedFd<'_>, name: &OsStr, xattr: &OsStr) -> SysResult<()> {
    let (path, xattr) = (cstr(name)?, cstr(xattr)?);
    // SAFETY: NUL-terminated strings.
    let ret = unsafe {
        libc::syscall(
            SYS_REMOVEXATTRAT,
            dir.as_raw_fd() as libc::c_long,
            path.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW as libc::c_long,
            xattr.as_ptr(),
        )
    };
    result(ret).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn dir_with_file_and_link() -> (tempfile::TempDir, std::fs::File) {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("f"), b"x").unwrap();
        std::os::unix::fs::symlink("f", t.path().join("l")).unwrap();
        let d = std::fs::File::open(t.path()).unwrap();
        (t, d)
    }

    #[test]
    fn fchmodat2_changes_a_file_and_refuses_a_symlink_without_following_it() {
        if !has_fchmodat2() {
            eprintln!("fchmodat2 missing (Linux < 6.6): nothing to test");
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        let (t, d) = dir_with_file_and_link();
        fchmodat2(d.as_fd(), OsStr::new("f"), 0o640).unwrap();
        let mode = |p: &str| {
            std::fs::metadata(t.path().join(p))
                .unwrap()
                .permissions()
                .mode()
        };
        assert_eq!(mode("f") & 0o7777, 0o640);
        assert_eq!(
            fchmodat2(d.as_fd(), OsStr::new("l"), 0o600),
            Err(Errno::OPNOTSUPP)
        );
        assert_eq!(mode("f") & 0o7777, 0o640, "the link's target is untouched");
        let pinned = rustix::fs::openat(
            d.as_fd(),
            "f",
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::NOFOLLOW,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        fchmodat2(pinned.as_fd(), OsStr::new(""), 0o604).unwrap();
        assert_eq!(mode("f") & 0o7777, 0o604, "an O_PATH fd itself");
    }

    #[test]
    fn xattrat_calls_read_write_list_and_remove_the_entry_itself() {
        if !has_xattrat() {
            eprintln!("*xattrat missing (Linux < 6.13): nothing to test");
            return;
        }
        let (t, d) = dir_with_file_and_link();
        let (f, x) = (OsStr::new("f"), OsStr::new("user.k"));
        if let Err(e) = setxattrat(d.as_fd(), f, x, b"v1", 0) {
            assert_eq!(e, Errno::OPNOTSUPP, "only a filesystem without user xattrs");
            return;
        }
        assert_eq!(getxattrat(d.as_fd(), f, x, &mut []), Ok(2));
        let mut buf = [0u8; 8];
        assert_eq!(getxattrat(d.as_fd(), f, x, &mut buf), Ok(2));
        assert_eq!(&buf[..2], b"v1");
        assert_eq!(
            getxattrat(d.as_fd(), f, x, &mut buf[..1]),
            Err(Errno::RANGE)
        );
        let mut list = [0u8; 64];
        let n = listxattrat(d.as_fd(), f, &mut list).unwrap();
        assert!(list[..n].split(|b| *b == 0).any(|s| s == b"user.k"));
        assert_eq!(
            setxattrat(d.as_fd(), f, x, b"v2", libc::XATTR_CREATE as u32),
            Err(Errno::EXIST)
        );
        // The link's own attributes (user xattrs are refused on symlinks), never the
        // target's.
        assert_eq!(
            getxattrat(d.as_fd(), OsStr::new("l"), x, &mut buf),
            Err(Errno::NODATA)
        );
        removexattrat(d.as_fd(), f, x).unwrap();
        assert_eq!(getxattrat(d.as_fd(), f, x, &mut buf), Err(Errno::NODATA));
        assert!(xattr_absent(&t.path().join("f")));
    }

    fn xattr_absent(p: &std::path::Path) -> bool {
        rustix::fs::getxattr(p, "user.k", &mut [0u8; 8]) == Err(Errno::NODATA)
    }
}
