//! Extended attributes of layer entries. Entries are named by (directory fd, one
//! component) and reached with the *xattrat calls (Linux 6.13, `at_calls.rs`); on
//! older kernels, and for an fd's own object, as `/proc/self/fd/DIR/NAME` with the
//! l* variants: the directory magic link is exact and the final component is never
//! followed.

use std::ffi::{OsStr, OsString};
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStringExt;

use rustix::fs::XattrFlags;

use super::at_calls;
use super::fs::proc_fd_path;
use super::{Errno, SysResult};

/// Where an xattr call goes: an entry in a directory, or the object behind an fd
/// itself.
#[derive(Clone, Copy)]
pub enum Target<'a> {
    Entry(BorrowedFd<'a>, &'a OsStr),
    /// Any fd, O_PATH included (layer directories are held as O_PATH).
    Fd(BorrowedFd<'a>),
    /// An fd open for I/O (never O_PATH): the f* calls take it as it is.
    Open(BorrowedFd<'a>),
}

/// How one xattr call reaches its object.
enum Way<'a> {
    /// The *xattrat calls on (directory, name), the name never followed.
    At(BorrowedFd<'a>, &'a OsStr),
    /// The f* calls on an fd open for I/O.
    Open(BorrowedFd<'a>),
    /// A procfs path; `true`: the path is an fd's magic link, to be followed.
    Path(std::ffi::CString, bool),
}

/// The procfs path of a target (kernels before 6.13, and an O_PATH fd that is no
/// directory): `/proc/self/fd/DIR/NAME` for an entry, the fd's magic link itself
/// otherwise.
fn procfs_way(target: Target<'_>) -> SysResult<Way<'static>> {
    Ok(match target {
        Target::Entry(dir, name) => {
            let mut bytes = proc_fd_path(dir).into_bytes();
            bytes.push(b'/');
            bytes.extend_from_slice(std::os::unix::ffi::OsStrExt::as_bytes(name));
            Way::Path(
                std::ffi::CString::new(bytes).map_err(|_| Errno::INVAL)?,
                false,
            )
        }
        Target::Fd(fd) | Target::Open(fd) => Way::Path(proc_fd_path(fd), true),
    })
}

/// Runs one xattr call `f` the cheapest way to its target: an entry by the *xattrat
/// calls where the kernel has them; an fd open for I/O by the f* calls; an O_PATH
/// directory by the *xattrat calls on its own "."; anything else by its procfs path.
fn call<T>(target: Target<'_>, mut f: impl FnMut(Way<'_>) -> SysResult<T>) -> SysResult<T> {
    if let Target::Entry(_, name) = target {
        super::fs::check_component(name)?;
    }
    match target {
        Target::Entry(dir, name) if at_calls::has_xattrat() => f(Way::At(dir, name)),
        Target::Open(fd) => f(Way::Open(fd)),
        Target::Fd(fd) if at_calls::has_xattrat() => match f(Way::At(fd, OsStr::new("."))) {
            Err(Errno::NOTDIR) => f(procfs_way(target)?),
            done => done,
        },
        _ => f(procfs_way(target)?),
    }
}

/// One getxattr; an empty `buf` asks for the size (rustix's reads answer at most
/// the buffer's length, so sizes come by its `_query` calls).
fn raw_get(target: Target<'_>, name: &OsStr, buf: &mut [u8]) -> SysResult<usize> {
    call(target, |way| match (way, buf.is_empty()) {
        (Way::At(dir, entry), _) => at_calls::getxattrat(dir, entry, name, buf),
        (Way::Open(fd), true) => rustix::fs::fgetxattr_query(fd, name),
        (Way::Open(fd), false) => rustix::fs::fgetxattr(fd, name, &mut *buf),
        (Way::Path(p, true), true) => rustix::fs::getxattr_query(&p, name),
        (Way::Path(p, false), true) => rustix::fs::lgetxattr_query(&p, name),
        (Way::Path(p, true), false) => rustix::fs::getxattr(&p, name, &mut *buf),
        (Way::Path(p, false), false) => rustix::fs::lgetxattr(&p, name, &mut *buf),
    })
}

/// One listxattr into `buf`.
fn raw_list(target: Target<'_>, buf: &mut [u8]) -> SysResult<usize> {
    call(target, |way| match way {
        Way::At(dir, entry) => at_calls::listxattrat(dir, entry, buf),
        Way::Open(fd) => rustix::fs::flistxattr(fd, &mut *buf),
        Way::Path(p, true) => rustix::fs::listxattr(&p, &mut *buf),
        Way::Path(p, false) => rustix::fs::llistxattr(&p, &mut *buf),
    })
}

pub fn get(target: Target<'_>, name: &OsStr) -> SysResult<Vec<u8>> {
    // The value may grow between the size query and the read: retry on ERANGE.
    for _ in 0..4 {
        let size = raw_get(target, name, &mut [])?;
        let mut buf = vec![0u8; size];
        match raw_get(target, name, &mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(Errno::RANGE) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Errno::RANGE)
}

/// Reads a value known to be short (markers, numbers, paths) with one syscall;
/// `None` when the attribute is absent or the filesystem has none. Longer values
/// fall back to [`get`].
pub fn get_small(target: Target<'_>, name: &OsStr) -> SysResult<Option<Vec<u8>>> {
    let mut buf = [0u8; 256];
    match raw_get(target, name, &mut buf) {
        Ok(n) => Ok(Some(buf[..n].to_vec())),
        Err(Errno::NODATA) | Err(Errno::OPNOTSUPP) => Ok(None),
        Err(Errno::RANGE) => get(target, name).map(Some),
        Err(e) => Err(e),
    }
}

/// Whether the attribute exists (without reading it).
pub fn exists(target: Target<'_>, name: &OsStr) -> SysResult<bool> {
    match raw_get(target, name, &mut []) {
        Ok(_) | Err(Errno::RANGE) => Ok(true),
        Err(Errno::NODATA) | Err(Errno::OPNOTSUPP) => Ok(false),
        Err(e) => Err(e),
    }
}

pub fn list(target: Target<'_>) -> SysResult<Vec<OsString>> {
    let mut size = 1024;
    loop {
        let mut buf = vec![0u8; size];
        match raw_list(target, &mut buf) {
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
}

/// `flags` as in setxattr(2): XATTR_CREATE / XATTR_REPLACE.
pub fn set(target: Target<'_>, name: &OsStr, value: &[u8], flags: i32) -> SysResult<()> {
    let xflags = XattrFlags::from_bits_retain(flags as u32);
    call(target, |way| match way {
        Way::At(dir, entry) => at_calls::setxattrat(dir, entry, name, value, flags as u32),
        Way::Open(fd) => rustix::fs::fsetxattr(fd, name, value, xflags),
        Way::Path(p, true) => rustix::fs::setxattr(&p, name, value, xflags),
        Way::Path(p, false) => rustix::fs::lsetxattr(&p, name, value, xflags),
    })
}

pub fn remove(target: Target<'_>, name: &OsStr) -> SysResult<()> {
    call(target, |way| match way {
        Way::At(dir, entry) => at_calls::removexattrat(dir, entry, name),
        Way::Open(fd) => rustix::fs::fremovexattr(fd, name),
        Way::Path(p, true) => rustix::fs::removexattr(&p, name),
        Way::Path(p, false) => rustix::fs::lremovexattr(&p, name),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::{Mode, OFlags};
    use std::os::fd::AsFd;

    /// Every way a target is reached (an entry, an fd open for I/O, any fd, an
    /// O_PATH file, an O_PATH directory) sets, reads, lists and removes the
    /// object's own attributes.
    #[test]
    fn every_kind_of_target_reaches_the_object_itself() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("f"), b"x").unwrap();
        std::fs::create_dir(t.path().join("d")).unwrap();
        let root =
            rustix::fs::open(t.path(), OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap();
        let open = std::fs::File::open(t.path().join("f")).unwrap();
        let pinned = |name: &str| {
            rustix::fs::openat(
                root.as_fd(),
                name,
                OFlags::PATH | OFlags::NOFOLLOW,
                Mode::empty(),
            )
            .unwrap()
        };
        let (pf, pd) = (pinned("f"), pinned("d"));
        let probe = OsStr::new("user.probe");
        if set(Target::Open(open.as_fd()), probe, b"1", 0) == Err(Errno::OPNOTSUPP) {
            eprintln!("no user xattrs here: nothing to test");
            return;
        }
        remove(Target::Open(open.as_fd()), probe).unwrap();
        let cases: [(&str, Target<'_>, &str); 6] = [
            ("entry", Target::Entry(root.as_fd(), OsStr::new("f")), "f"),
            ("open fd", Target::Open(open.as_fd()), "f"),
            ("open fd as any fd", Target::Fd(open.as_fd()), "f"),
            ("O_PATH file", Target::Fd(pf.as_fd()), "f"),
            ("O_PATH dir", Target::Fd(pd.as_fd()), "d"),
            (
                "dir entry",
                Target::Entry(root.as_fd(), OsStr::new("d")),
                "d",
            ),
        ];
        for (what, target, object) in cases {
            let name = OsStr::new("user.k");
            set(target, name, what.as_bytes(), 0).unwrap();
            let path = t.path().join(object);
            assert_eq!(
                rustix::fs::getxattr(&path, "user.k", &mut [0u8; 32][..]),
                Ok(what.len()),
                "{what}: set on the object"
            );
            assert_eq!(get(target, name).unwrap(), what.as_bytes(), "{what}");
            assert_eq!(get_small(target, name).unwrap().unwrap(), what.as_bytes());
            assert!(exists(target, name).unwrap(), "{what}");
            assert!(
                list(target).unwrap().iter().any(|n| n == "user.k"),
                "{what}"
            );
            remove(target, name).unwrap();
            assert!(!exists(target, name).unwrap(), "{what}: removed");
            assert_eq!(get(target, name), Err(Errno::NODATA), "{what}");
        }
    }
}
