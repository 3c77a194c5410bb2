//! Stable inode numbers across copy-up and remount (the kernel's `origin` idea).
//!
//! Invariants:
//! - A copied-up entry carries `<ns>.stratafs.origin` = the st_ino it was shown with
//!   before the copy, so it keeps that number after the copy and after a remount.
//! - d_ino equals st_ino: a listing reads the marker of upper entries wherever one
//!   can be (a directory merged with lower layers, or an upper-only directory marked
//!   `<ns>.stratafs.impure` because a copied-up entry was moved into it).

use std::ffi::OsStr;
use std::os::fd::BorrowedFd;

use super::{Ino, Union};
use crate::sys::{self, xattr::Target};

impl Union {
    /// The number recorded on an upper entry at copy-up, if any.
    pub(crate) fn origin_ino(&self, target: Target<'_>) -> Option<Ino> {
        let value = sys::xattr::get_small(target, &self.xattr_ns.own("origin")).ok()??;
        std::str::from_utf8(&value).ok()?.parse().ok()
    }

    /// Records the number a copy must keep. Best effort: without it the copy shows
    /// its own number after a remount (user.* xattrs cannot be set on symlinks and
    /// device nodes, so rootless mounts lose it for those).
    pub(crate) fn set_origin(&self, target: Target<'_>, ino: Ino) {
        let value = ino.to_string();
        if let Err(e) = sys::xattr::set(target, &self.xattr_ns.own("origin"), value.as_bytes(), 0) {
            log::debug!("copy-up: origin {ino} not recorded: {e}");
        }
    }

    /// Marks an upper-only directory as holding entries whose numbers come from
    /// their origin marker.
    pub(crate) fn mark_impure(&self, dir: BorrowedFd<'_>) {
        let key = self.xattr_ns.own("impure");
        if !matches!(sys::xattr::exists(Target::Fd(dir), &key), Ok(true)) {
            if let Err(e) = sys::xattr::set(Target::Fd(dir), &key, b"y", 0) {
                log::debug!("rename: impure marker not set: {e}");
            }
        }
    }

    pub(crate) fn is_impure(&self, dir: BorrowedFd<'_>) -> bool {
        matches!(
            sys::xattr::exists(Target::Fd(dir), &self.xattr_ns.own("impure")),
            Ok(true)
        )
    }

    /// The number an upper entry `dir/name` is shown with: its origin's, else its own.
    pub(crate) fn upper_entry_ino(&self, dir: BorrowedFd<'_>, name: &OsStr, real: u64) -> Ino {
        self.origin_ino(Target::Entry(dir, name))
            .unwrap_or_else(|| self.derived_ino(super::UPPER, real))
    }
}
