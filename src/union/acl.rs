//! POSIX ACLs (kernel `fs/posix_acl.c` semantics), enforced by the kernel once
//! FUSE_POSIX_ACL is negotiated. The kernel then reads `system.posix_acl_*` through
//! getxattr and checks them itself; what stays the daemon's is what the kernel
//! leaves to the filesystem: the mode of a new entry under a default ACL (which the
//! umask must not touch), and the set-group-ID rules of ACL and data changes.
//!
//! The layers' own filesystem does the rest when the daemon writes there: setting
//! an access ACL updates the file's mode, chmod updates the ACL's mask, and a new
//! entry under a directory with a default ACL gets its access (and, for
//! directories, default) ACL. The modes computed here agree with what that
//! filesystem computes, so chmod-ing a new entry to them changes nothing.

use std::ffi::OsStr;

use super::{Attr, Caller, Ino, Result, SetAttr, Union};
use crate::sys;

const ACCESS_XATTR: &str = "system.posix_acl_access";
const DEFAULT_XATTR: &str = "system.posix_acl_default";

/// The xattr format: a little-endian u32 version, then 8-byte entries
/// (u16 tag, u16 perm, u32 id).
const XATTR_VERSION: u32 = 2;
const ACL_USER_OBJ: u16 = 0x01;
const ACL_GROUP_OBJ: u16 = 0x04;
const ACL_MASK: u16 = 0x10;
const ACL_OTHER: u16 = 0x20;

/// The permission bits a default ACL lets a new entry keep (posix_acl_create_masq):
/// user::, then mask:: (group:: when there is no mask), then other::. `None` when the
/// value is not a well-formed ACL.
pub(crate) fn default_acl_perm_mask(value: &[u8]) -> Option<u32> {
    let (head, entries) = value.split_at_checked(4)?;
    if u32::from_le_bytes(head.try_into().ok()?) != XATTR_VERSION || entries.len() % 8 != 0 {
        return None;
    }
    let (mut user, mut group, mut mask, mut other) = (None, None, None, None);
    for e in entries.chunks_exact(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let perm = u32::from(u16::from_le_bytes([e[2], e[3]]) & 0o7);
        match tag {
            ACL_USER_OBJ => user = Some(perm),
            ACL_GROUP_OBJ => group = Some(perm),
            ACL_MASK => mask = Some(perm),
            ACL_OTHER => other = Some(perm),
            _ => {}
        }
    }
    Some(user? << 6 | mask.or(group)? << 3 | other?)
}

impl Union {
    /// Whether ACLs are enforced: asked for (no `noacl`), xattrs on, and owners shown
    /// as stored. Under id mappings or override xattrs an ACL's ids and the mode it
    /// must agree with are not the ones the kernel is shown, so there the kernel
    /// checks the shown mode only (as before ACL support).
    pub fn posix_acls(&self) -> bool {
        self.opts.acl && self.opts.xattrs && self.owner.is_plain()
    }

    /// Whether `name` is the access ACL while ACLs are enforced (setting it by
    /// someone outside the file's group clears set-group-ID).
    pub fn is_access_acl(&self, name: &OsStr) -> bool {
        self.posix_acls() && name == ACCESS_XATTR
    }

    /// The mode a new entry of `parent` is made with, from the `mode` and `umask` of
    /// the create request: under a default ACL the ACL masks the mode and the umask
    /// is ignored; elsewhere the umask applies (the kernel sends it unapplied once
    /// FUSE_DONT_MASK is negotiated, and applying it twice changes nothing).
    pub fn creation_mode(&self, parent: Ino, mode: u32, umask: u32) -> u32 {
        let masked = mode & !(umask & 0o777);
        if !self.posix_acls() {
            return masked;
        }
        match self.getxattr(parent, OsStr::new(DEFAULT_XATTR)) {
            Ok(v) => match default_acl_perm_mask(&v) {
                Some(keep) => mode & !0o777 | mode & keep,
                None => masked,
            },
            Err(_) => masked,
        }
    }

    /// Clears the set-user-ID and set-group-ID bits of `ino` that the VFS clears after
    /// `change` by `caller` (fs/attr.c: should_remove_suid, setattr_should_drop_sgid,
    /// and posix_acl_update_mode for an access ACL). The kernel's FUSE client leaves
    /// all of it to the filesystem (FUSE_HANDLE_KILLPRIV_V2, negotiated so that a
    /// write does not first ask for security.capability); security.capability
    /// itself is dropped by the layer filesystem when the daemon writes, truncates or
    /// chowns the real file. `after`: the attributes after the change, where the
    /// caller has them from the change itself (saving a stat). Returns the new
    /// attributes when the mode changed.
    pub fn kill_privs_after_change(
        &self,
        caller: Caller,
        ino: Ino,
        change: PrivChange,
        after: Option<Attr>,
    ) -> Result<Option<Attr>> {
        let attr = match after {
            Some(a) => a,
            None => self.getattr(ino)?,
        };
        let mode = attr.mode;
        if mode & (libc::S_ISUID | libc::S_ISGID) == 0 || mode & libc::S_IFMT == libc::S_IFDIR {
            return Ok(None);
        }
        // pid 0: a request the kernel makes on its own (no caller to judge).
        if caller.pid == 0 {
            return Ok(None);
        }
        let group = match change {
            PrivChange::Owner { group_before } => group_before.unwrap_or(attr.gid),
            _ => attr.gid,
        };
        // A caller that cannot be read keeps the bits: never cleared on a guess.
        let standing = sys::process::caller_standing(caller.pid, group).unwrap_or(
            sys::process::CallerStanding {
                in_group: true,
                may_fsetid: true,
            },
        );
        let gexec = mode & libc::S_IXGRP != 0;
        let sgid_goes =
            mode & libc::S_ISGID != 0 && (gexec || !(standing.in_group || standing.may_fsetid));
        let kill = match change {
            PrivChange::Data { may_fsetid } => {
                if may_fsetid.unwrap_or(standing.may_fsetid) {
                    0
                } else {
                    libc::S_ISUID | if sgid_goes { libc::S_ISGID } else { 0 }
                }
            }
            // A chown clears set-user-ID whoever makes it.
            PrivChange::Owner { .. } => libc::S_ISUID | if sgid_goes { libc::S_ISGID } else { 0 },
            PrivChange::AccessAcl => {
                if standing.in_group || standing.may_fsetid {
                    0
                } else {
                    libc::S_ISGID
                }
            }
        };
        if mode & kill == 0 {
            return Ok(None);
        }
        let set = SetAttr {
            mode: Some(mode & 0o7777 & !kill),
            ..SetAttr::default()
        };
        let attr = self.setattr(ino, &set, None)?;
        self.attrs_changed(ino);
        Ok(Some(attr))
    }
}

/// What a caller changed, for [`Union::kill_privs_after_change`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrivChange {
    /// Data or size: write, truncate, fallocate, copy_file_range. `may_fsetid`: the
    /// kernel's own answer where the request carries it (FUSE_WRITE_KILL_SUIDGID
    /// is set exactly when the writer lacks CAP_FSETID); `None`: read from /proc.
    Data { may_fsetid: Option<bool> },
    /// Owner or group, with the group the file had before.
    Owner { group_before: Option<u32> },
    /// The access ACL (which rewrites the mode's group bits).
    AccessAcl,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(entries: &[(u16, u16)]) -> Vec<u8> {
        let mut v = XATTR_VERSION.to_le_bytes().to_vec();
        for &(tag, perm) in entries {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&perm.to_le_bytes());
            v.extend_from_slice(&u32::MAX.to_le_bytes());
        }
        v
    }

    #[test]
    fn the_mask_entry_stands_for_the_group_bits_when_present() {
        let with_mask = acl(&[
            (ACL_USER_OBJ, 7),
            (0x02, 5),
            (ACL_GROUP_OBJ, 7),
            (ACL_MASK, 5),
            (ACL_OTHER, 0),
        ]);
        assert_eq!(default_acl_perm_mask(&with_mask), Some(0o750));
        let minimal = acl(&[(ACL_USER_OBJ, 6), (ACL_GROUP_OBJ, 4), (ACL_OTHER, 4)]);
        assert_eq!(default_acl_perm_mask(&minimal), Some(0o644));
    }

    #[test]
    fn malformed_values_are_not_acls() {
        assert_eq!(default_acl_perm_mask(&[]), None);
        assert_eq!(default_acl_perm_mask(&acl(&[(ACL_USER_OBJ, 7)])), None);
        let mut bad = acl(&[(ACL_USER_OBJ, 7), (ACL_GROUP_OBJ, 7), (ACL_OTHER, 7)]);
        bad.push(0);
        assert_eq!(default_acl_perm_mask(&bad), None);
        bad.pop();
        bad[0] = 1;
        assert_eq!(default_acl_perm_mask(&bad), None);
    }
}
