//! Stable inode numbers across copy-up and remount (the kernel's `origin` idea).
//!
//! Invariants:
//! - A copied-up entry carries `<ns>.stratafs.origin` = the st_ino it was shown with
//!   before the copy, so it keeps that number after the copy and after a remount.
//! - The copy of a lower hard-link group (see hardlink.rs) records how its shown
//!   st_nlink differs from its own count, as `<ino>:<adjust>` (kernel overlayfs keeps
//!   the same in `trusted.overlay.nlink`): names of the group not yet linked to the
//!   copy and names outside every layer add to it, the copy's index entry takes one
//!   off. Copies made by earlier versions carry the outside links alone there, which
//!   is the same sum for a copy with no index entry.
//! - d_ino equals st_ino: a listing reads the marker of upper entries wherever one
//!   can be (a directory merged with lower layers, or an upper-only directory marked
//!   `<ns>.stratafs.impure` because a copied-up entry was moved into it).

use std::ffi::OsStr;
use std::fmt;
use std::os::fd::BorrowedFd;

use super::{Ino, Union};
use crate::sys::{self, xattr::Target};

impl Union {
    /// The number recorded on an upper entry at copy-up, if any, and how its shown
    /// st_nlink differs from its own.
    pub(crate) fn origin(&self, target: Target<'_>) -> Option<Origin> {
        let value = sys::xattr::get_small(target, &self.xattr_ns.own("origin")).ok()??;
        Origin::parse(&value)
    }

    /// The number recorded on an upper entry at copy-up, if any.
    pub(crate) fn origin_ino(&self, target: Target<'_>) -> Option<Ino> {
        self.origin(target).map(|o| o.ino)
    }

    /// Writes the origin marker of `target` (numbered `ino`) with the difference
    /// between its shown st_nlink and its own.
    pub(crate) fn set_nlink_adjust(
        &self,
        target: Target<'_>,
        ino: Ino,
        nlink_adjust: i64,
    ) -> sys::SysResult<()> {
        let value = Origin { ino, nlink_adjust }.to_string();
        sys::xattr::set(target, &self.xattr_ns.own("origin"), value.as_bytes(), 0)
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

/// What an origin marker says: `<ino>` or `<ino>:<st_nlink adjustment>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Origin {
    pub ino: Ino,
    pub nlink_adjust: i64,
}

impl Origin {
    fn parse(value: &[u8]) -> Option<Origin> {
        let text = std::str::from_utf8(value).ok()?;
        let (ino, adjust) = match text.split_once(':') {
            Some((ino, adjust)) => (ino, adjust.parse().ok()?),
            None => (text, 0),
        };
        Some(Origin {
            ino: ino.parse().ok()?,
            nlink_adjust: adjust,
        })
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.nlink_adjust {
            0 => write!(f, "{}", self.ino),
            n => write!(f, "{}:{n}", self.ino),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_markers_round_trip_and_garbage_is_no_marker() {
        for o in [
            Origin {
                ino: 42,
                nlink_adjust: 0,
            },
            Origin {
                ino: 7,
                nlink_adjust: 3,
            },
            Origin {
                ino: 7,
                nlink_adjust: -1,
            },
        ] {
            assert_eq!(Origin::parse(o.to_string().as_bytes()), Some(o));
        }
        assert_eq!(
            Origin::parse(b"42"),
            Some(Origin {
                ino: 42,
                nlink_adjust: 0
            })
        );
        for bad in [
            &b""[..],
            b"x",
            b"1:",
            b":2",
            b"1:x",
            b"\xff\xfe",
            b"99999999999999999999",
        ] {
            assert_eq!(Origin::parse(bad), None, "{bad:?}");
        }
    }
}
