//! Directory redirects (kernel overlayfs `redirect_dir=on`): a directory with lower
//! content is moved by renaming its upper copy and recording, in an xattr on it, the
//! absolute path where its lower content lives. Lookup follows that path in every
//! layer below the one holding the redirect.
//!
//! Invariants:
//! - A redirect is always written as an absolute path ("/a/b"), the form the kernel
//!   reads in every case; relative values (a sibling name, written by the kernel) are
//!   read too.
//! - The value names the content's place in the *lower* layers, which never change:
//!   moving a redirected directory again keeps its value; moving a parent of it does
//!   not touch it.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use super::inode::{Inode, ROOT_INO};
use super::whiteout::{self, XattrNs};
use super::{Errno, Result, Union};
use crate::sys::{self, xattr::Target};

/// What the top copy of a directory says about the layers below it.
pub(crate) struct DirMarks {
    pub opaque: bool,
    pub redirect: Option<OsString>,
}

/// Reads the opaque and redirect markers of a directory with one listxattr in the
/// common case of a directory that has neither.
pub(crate) fn dir_marks(dir: BorrowedFd<'_>, want_opaque: bool) -> Result<DirMarks> {
    let names = sys::xattr::list(Target::Fd(dir)).unwrap_or_default();
    let mut redirect = None;
    for ns in [XattrNs::Trusted, XattrNs::User] {
        let key = ns.overlay("redirect");
        if redirect.is_none() && names.contains(&key) {
            redirect = sys::xattr::get_small(Target::Fd(dir), &key)?
                .filter(|v| is_valid_redirect(v))
                .map(OsString::from_vec);
        }
    }
    let opaque = want_opaque && whiteout::dir_is_opaque_given(dir, &names)?;
    Ok(DirMarks { opaque, redirect })
}

/// A redirect value must be a path of real components: nothing empty beyond the
/// leading slash, no `.` or `..`, no NUL. Anything else in a (hostile) layer is
/// ignored rather than followed.
pub(crate) fn is_valid_redirect(value: &[u8]) -> bool {
    let rest = value.strip_prefix(b"/").unwrap_or(value);
    !rest.is_empty()
        && value.len() < 4096
        && rest
            .split(|b| *b == b'/')
            .all(|c| !c.is_empty() && c != b"." && c != b".." && !c.contains(&0))
}

/// Joins a directory's lower path and a child name.
pub(crate) fn join(dir: &OsStr, name: &OsStr) -> OsString {
    let mut v = dir.as_bytes().to_vec();
    v.push(b'/');
    v.extend_from_slice(name.as_bytes());
    OsString::from_vec(v)
}

/// Where a directory at absolute lower path `at`, whose copy in some layer carries
/// the redirect `value`, has its content in the layers below that one: `value`
/// itself when absolute, else the sibling of `at` it names (the kernel writes a
/// relative value for a move within one directory).
pub(crate) fn chained(at: &OsStr, value: OsString) -> OsString {
    if value.as_bytes().starts_with(b"/") {
        return value;
    }
    let at = at.as_bytes();
    let parent = match at.iter().rposition(|b| *b == b'/') {
        Some(i) => &at[..i],
        None => b"".as_slice(),
    };
    join(OsStr::from_bytes(parent), &value)
}

/// Where a path leads in one layer.
pub(crate) enum Walk {
    /// A directory; `opaque` when it or a directory on the way to it is opaque, so
    /// that the layers below contribute nothing more.
    Dir { fd: OwnedFd, opaque: bool },
    /// Nothing there: the layer contributes nothing, the layers below may.
    Missing,
    /// A whiteout, a non-directory or an opaque directory on the way: this layer
    /// contributes nothing and hides the layers below.
    Stop,
}

/// Follows an absolute lower path from a layer's root, one checked component at a
/// time, never following symlinks. As in kernel overlayfs, an opaque directory on
/// the way ends the search in the layers below.
pub(crate) fn walk(root: BorrowedFd<'_>, path: &OsStr) -> Result<Walk> {
    let mut cur: Option<OwnedFd> = None;
    let mut opaque = false;
    for comp in path
        .as_bytes()
        .split(|b| *b == b'/')
        .filter(|c| !c.is_empty())
    {
        let name = OsStr::from_bytes(comp);
        let dir = cur.as_ref().map_or(root, |f| f.as_fd());
        match whiteout::probe(dir, name, true)? {
            whiteout::Probe::Entry(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => {}
            whiteout::Probe::Missing if !opaque => return Ok(Walk::Missing),
            _ => return Ok(Walk::Stop),
        }
        let next = sys::fs::open_dir(dir, name)?;
        opaque |= whiteout::dir_is_opaque(next.as_fd())?;
        cur = Some(next);
    }
    match cur {
        Some(fd) => Ok(Walk::Dir { fd, opaque }),
        None => Ok(Walk::Missing),
    }
}

impl Union {
    /// The absolute path, in the lower layers, of the content merged under directory
    /// `inode`: its redirect, or its parent's path plus its name.
    pub(crate) fn lower_path(&self, inode: &Inode) -> Result<OsString> {
        self.path_from_root(inode, true)
    }

    /// The absolute path of `inode` in the merged view (and so in the upper layer,
    /// once copied up), from the names it was last reached by.
    pub(crate) fn view_path(&self, inode: &Inode) -> Result<OsString> {
        self.path_from_root(inode, false)
    }

    fn path_from_root(&self, inode: &Inode, follow_redirects: bool) -> Result<OsString> {
        let mut names = Vec::new();
        let base = self.walk_up(inode, |i| {
            if i.ino == ROOT_INO {
                return Ok(Some(OsString::new()));
            }
            let st = i.state.read();
            if let Some(r) = st.redirect().filter(|_| follow_redirects) {
                return Ok(Some(r.to_os_string()));
            }
            names.push(Box::<OsStr>::from(st.name()));
            Ok(None)
        })?;
        Ok(names
            .iter()
            .rev()
            .fold(base, |path, name| join(&path, name)))
    }

    /// Turns a redirect value read under directory `parent` into an absolute path.
    pub(crate) fn absolute_redirect(&self, parent: &Inode, value: OsString) -> Result<OsString> {
        if value.as_bytes().starts_with(b"/") {
            Ok(value)
        } else {
            Ok(join(&self.lower_path(parent)?, &value))
        }
    }

    /// Records on the upper copy of directory `inode` where its lower content lives,
    /// so that it can be moved by a plain rename. Fails with EXDEV (the caller then
    /// copies, like `mv` does) when the upper filesystem cannot store the xattr.
    pub(crate) fn set_redirect(&self, upper: BorrowedFd<'_>, origin: &OsStr) -> Result<()> {
        let key = self.xattr_ns.overlay("redirect");
        sys::xattr::set(Target::Fd(upper), &key, origin.as_bytes(), 0).map_err(|e| {
            log::warn!("rename: cannot record redirect {origin:?}: {e}; answering EXDEV");
            Errno::XDEV.into()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_values_are_checked() {
        assert!(is_valid_redirect(b"/a/b"));
        assert!(is_valid_redirect(b"sibling"));
        assert!(!is_valid_redirect(b"/"));
        assert!(!is_valid_redirect(b""));
        assert!(!is_valid_redirect(b"/a/../etc"));
        assert!(!is_valid_redirect(b"/a//b"));
        assert!(!is_valid_redirect(b"./x"));
    }

    #[test]
    fn chained_redirects_are_absolute_or_siblings() {
        assert_eq!(
            chained(OsStr::new("/a/b"), "/x/y".into()),
            OsString::from("/x/y")
        );
        assert_eq!(
            chained(OsStr::new("/a/b"), "c".into()),
            OsString::from("/a/c")
        );
        assert_eq!(chained(OsStr::new("/b"), "a".into()), OsString::from("/a"));
    }

    #[test]
    fn join_builds_absolute_paths() {
        assert_eq!(join(OsStr::new(""), OsStr::new("a")), OsString::from("/a"));
        assert_eq!(
            join(OsStr::new("/a"), OsStr::new("b")),
            OsString::from("/a/b")
        );
    }
}
