//! The on-disk markers of the overlay format: whiteouts, opaque directories and
//! private xattrs. Pure codecs here (fuzzed); the few writes live at the bottom.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use std::sync::atomic::Ordering;

use super::Union;
use crate::sys::{self, Errno, SysResult, fs::RenameKind, xattr::Target};

/// AUFS-format whiteout prefix used by containers/storage layers: `.wh.NAME` hides NAME.
pub const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// AUFS-format opaque marker: a directory containing it hides everything below it.
pub const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// xattrs that mark a directory opaque when their value is "y".
pub const OPAQUE_XATTRS: [&str; 3] = [
    "trusted.overlay.opaque",
    "user.overlay.opaque",
    "user.fuseoverlayfs.opaque",
];

/// Prefixes of xattrs that belong to the overlay format and are never shown.
const PRIVATE_XATTR_PREFIXES: [&[u8]; 7] = [
    b"trusted.overlay.",
    b"trusted.stratafs.",
    b"user.overlay.",
    b"user.fuseoverlayfs.",
    b"user.stratafs.",
    b"security.fuseoverlayfs.",
    // containers/storage's owner/mode record (`xattr_permissions=2`).
    b"user.containers.override_stat",
];

/// The name an AUFS whiteout entry hides, or `None` when `name` is not a whiteout.
/// Names of the form `.wh..wh.*` are AUFS metadata (the opaque marker, hard-link
/// dirs), never whiteouts of a name.
pub fn whiteout_target(name: &OsStr) -> Option<&OsStr> {
    let rest = name.as_bytes().strip_prefix(WHITEOUT_PREFIX)?;
    if rest.is_empty() || rest.starts_with(WHITEOUT_PREFIX) {
        return None;
    }
    Some(OsStr::from_bytes(rest))
}

pub fn whiteout_name(name: &OsStr) -> OsString {
    let mut v = WHITEOUT_PREFIX.to_vec();
    v.extend_from_slice(name.as_bytes());
    OsString::from_vec(v)
}

/// Names in the `.wh.` namespace are reserved: a file created under such a name in a
/// layer would be read back as a whiteout, so none can be created through the mount.
pub fn is_reserved_name(name: &OsStr) -> bool {
    name.as_bytes().starts_with(WHITEOUT_PREFIX)
}

/// Whether a stat result is an overlay whiteout (a char device 0/0).
pub fn is_whiteout_stat(mode: u32, rdev: u64) -> bool {
    mode & libc::S_IFMT == libc::S_IFCHR && rdev == 0
}

pub fn is_opaque_value(value: &[u8]) -> bool {
    value == b"y"
}

pub fn is_private_xattr(name: &OsStr) -> bool {
    let b = name.as_bytes();
    PRIVATE_XATTR_PREFIXES.iter().any(|p| b.starts_with(p))
}

/// What one layer's directory holds at a name, whiteouts of both formats told apart.
pub(crate) enum Probe {
    /// A real entry (not a char device 0/0).
    Entry(sys::fs::Stat),
    /// A char device 0/0 at the name.
    CharWhiteout,
    /// Nothing at the name, but a `.wh.NAME` beside it.
    AufsWhiteout,
    Missing,
}

/// Looks `name` up in `dir` as the overlay format reads it. Only a failure to stat
/// the name itself is an error: a name too long to carry the AUFS prefix (or any
/// other failure to stat `.wh.NAME`) means it has no AUFS whiteout.
///
/// `layers_below`: whether layers below this directory's count for the caller. A
/// `.wh.NAME` hides the name only below its own layer, so without such layers it is
/// not looked for (one stat fewer for every miss at the bottom of a merge, and in
/// every directory that lives in the upper layer alone) and the answer is `Missing`.
pub(crate) fn probe(dir: BorrowedFd<'_>, name: &OsStr, layers_below: bool) -> SysResult<Probe> {
    match sys::fs::stat_at(dir, name) {
        Ok(st) if is_whiteout_stat(st.st_mode, st.st_rdev) => Ok(Probe::CharWhiteout),
        Ok(st) => Ok(Probe::Entry(st)),
        Err(Errno::NOENT) if !layers_below => Ok(Probe::Missing),
        Err(Errno::NOENT) => match sys::fs::stat_at(dir, &whiteout_name(name)) {
            Ok(_) => Ok(Probe::AufsWhiteout),
            Err(_) => Ok(Probe::Missing),
        },
        Err(e) => Err(e),
    }
}

/// Whether the directory behind `dir` is opaque in either format.
pub fn dir_is_opaque(dir: BorrowedFd<'_>) -> SysResult<bool> {
    let names = sys::xattr::list(Target::Fd(dir)).unwrap_or_default();
    dir_is_opaque_given(dir, &names)
}

/// [`dir_is_opaque`] for a caller that already listed the directory's xattr names.
pub fn dir_is_opaque_given(dir: BorrowedFd<'_>, xattr_names: &[OsString]) -> SysResult<bool> {
    for name in xattr_names {
        if OPAQUE_XATTRS
            .iter()
            .any(|o| name.as_bytes() == o.as_bytes())
        {
            match sys::xattr::get(Target::Fd(dir), name) {
                Ok(v) if is_opaque_value(&v) => return Ok(true),
                _ => {}
            }
        }
    }
    match sys::fs::stat_at(dir, OsStr::new(OPAQUE_MARKER)) {
        Ok(_) => Ok(true),
        Err(Errno::NOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The xattr namespace this mount writes its markers in: trusted.* where the daemon
/// may set it (CAP_SYS_ADMIN), else user.* (rootless; kernel overlayfs `userxattr`).
/// Readers accept both, so layers written either way are understood.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XattrNs {
    Trusted,
    User,
}

impl XattrNs {
    fn prefix(self) -> &'static str {
        match self {
            XattrNs::Trusted => "trusted",
            XattrNs::User => "user",
        }
    }

    /// A marker of the kernel's format: `<ns>.overlay.<what>`.
    pub fn overlay(self, what: &str) -> OsString {
        format!("{}.overlay.{what}", self.prefix()).into()
    }

    /// A marker of stratafs's own: `<ns>.stratafs.<what>`.
    pub fn own(self, what: &str) -> OsString {
        format!("{}.stratafs.{what}", self.prefix()).into()
    }
}

/// How this mount writes whiteouts: decided once by probing the work directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhiteoutStyle {
    /// char device 0/0 (needs CAP_MKNOD: root outside a user namespace).
    CharDevice,
    /// `.wh.NAME` regular files (rootless).
    AufsFile,
}

/// Marks a directory opaque: with the xattr this process may set (trusted.* needs
/// CAP_SYS_ADMIN, else user.*), plus the AUFS marker file so that readers of either
/// format agree.
pub fn mark_opaque(dir: BorrowedFd<'_>) -> SysResult<()> {
    let mut marked = false;
    for name in ["trusted.overlay.opaque", "user.overlay.opaque"] {
        if sys::xattr::set(Target::Fd(dir), OsStr::new(name), b"y", 0).is_ok() {
            marked = true;
            break;
        }
    }
    match sys::fs::open_at(
        dir,
        OsStr::new(OPAQUE_MARKER),
        rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CREATE,
        0o600,
    ) {
        Ok(_) => Ok(()),
        Err(e) if marked => {
            log::warn!("opaque marker file not written ({e}); the xattr stands");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// The whiteout in the work directory (beside `work` and `index`) that char-device
/// whiteouts are hard links of, as kernel overlayfs shares one: a link needs no new
/// inode, whose allocation is most of what a whiteout costs (unlink of a lower file:
/// 100 µs of daemon time with a device node each, 21 µs with links, on ext4). It
/// holds no data; a mount removes it at start.
pub(crate) const SHARED_WHITEOUT: &str = "#stratafs-whiteout";

/// How many times a whiteout link is tried before a device node is made instead:
/// once, again after making the shared whiteout, again after replacing one that
/// reached the filesystem's link limit.
const SHARED_WHITEOUT_TRIES: usize = 3;

impl Union {
    /// Writes a whiteout for `name` in `dir` in the mount's style; for char-device
    /// whiteouts a link of [`SHARED_WHITEOUT`] where the work directory's
    /// filesystem takes it, else a device node of its own. EEXIST if `name` exists
    /// (AUFS whiteouts: an existing one counts as success, as in [`write_whiteout`]).
    pub(crate) fn make_whiteout(&self, dir: BorrowedFd<'_>, name: &OsStr) -> super::Result<()> {
        let (Some(root), WhiteoutStyle::CharDevice) = (&self.workdir_root, self.whiteout_style)
        else {
            return Ok(write_whiteout(dir, name, self.whiteout_style)?);
        };
        let shared = OsStr::new(SHARED_WHITEOUT);
        for _ in 0..SHARED_WHITEOUT_TRIES {
            if !self.shared_whiteout.load(Ordering::Relaxed) {
                break;
            }
            let remade = match sys::fs::link_at(root.as_fd(), shared, dir, name) {
                Ok(()) => return Ok(()),
                Err(Errno::EXIST) => return Err(Errno::EXIST.into()),
                // Another thread making it at the same time is as good.
                Err(Errno::NOENT) => {
                    match sys::fs::mknod_at(root.as_fd(), shared, libc::S_IFCHR, 0) {
                        Ok(()) | Err(Errno::EXIST) => Ok(()),
                        Err(e) => Err(e.into()),
                    }
                }
                // A fresh one takes its place; links made so far stay whiteouts.
                Err(Errno::MLINK) => self.publish_from_work(
                    |work, temp| Ok(sys::fs::mknod_at(work, temp, libc::S_IFCHR, 0)?),
                    root.as_fd(),
                    shared,
                    RenameKind::Replace,
                ),
                Err(e) => Err(e.into()),
            };
            if let Err(e) = remade {
                log::info!("whiteouts are device nodes of their own: the shared one failed ({e})");
                self.shared_whiteout.store(false, Ordering::Relaxed);
            }
        }
        Ok(write_whiteout(dir, name, WhiteoutStyle::CharDevice)?)
    }
}

/// Writes a whiteout for `name` in `dir` in the given style. An existing AUFS
/// whiteout counts as success (a crash may have left one behind).
pub fn write_whiteout(dir: BorrowedFd<'_>, name: &OsStr, style: WhiteoutStyle) -> SysResult<()> {
    let res = match style {
        WhiteoutStyle::CharDevice => sys::fs::mknod_at(dir, name, libc::S_IFCHR, 0),
        WhiteoutStyle::AufsFile => sys::fs::open_at(
            dir,
            &whiteout_name(name),
            rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CREATE | rustix::fs::OFlags::EXCL,
            0,
        )
        .map(drop),
    };
    match res {
        Err(Errno::EXIST) if style == WhiteoutStyle::AufsFile => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whiteout_names_round_trip() {
        let name = OsStr::new("foo.txt");
        assert_eq!(whiteout_target(&whiteout_name(name)), Some(name));
        assert_eq!(whiteout_target(OsStr::new("foo")), None);
        assert_eq!(whiteout_target(OsStr::new(".wh.")), None);
        assert_eq!(whiteout_target(OsStr::new(OPAQUE_MARKER)), None);
        assert_eq!(whiteout_target(OsStr::new(".wh..wh.plnk")), None);
        assert_eq!(
            whiteout_target(OsStr::new(".wh..hidden")),
            Some(OsStr::new(".hidden"))
        );
    }

    #[test]
    fn private_xattrs_are_recognised() {
        assert!(is_private_xattr(OsStr::new("trusted.overlay.opaque")));
        assert!(is_private_xattr(OsStr::new("user.overlay.redirect")));
        assert!(is_private_xattr(OsStr::new("user.fuseoverlayfs.origin")));
        assert!(is_private_xattr(OsStr::new("user.stratafs.x")));
        assert!(is_private_xattr(OsStr::new(
            "user.containers.override_stat"
        )));
        assert!(is_private_xattr(OsStr::new(
            "security.fuseoverlayfs.override_stat"
        )));
        assert!(!is_private_xattr(OsStr::new("user.mime_type")));
        assert!(!is_private_xattr(OsStr::new("security.capability")));
    }

    #[test]
    fn whiteout_stat_is_char_zero_zero_only() {
        assert!(is_whiteout_stat(libc::S_IFCHR | 0o644, 0));
        assert!(!is_whiteout_stat(libc::S_IFCHR | 0o644, 0x0103));
        assert!(!is_whiteout_stat(libc::S_IFREG | 0o644, 0));
    }
}
