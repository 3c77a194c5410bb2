//! Ownership as the mount shows it and as it is stored: the fuse-overlayfs options
//! `uidmapping=`/`gidmapping=`, `squash_to_*` and `xattr_permissions=`.
//!
//! Invariants:
//! - Layers store ids in their own ("stored") space; the kernel only ever sees ids in
//!   the shown space. A mapping `C:H:N` shows stored id C+i as H+i (fuse-overlayfs's
//!   direction: containers/storage passes ContainerID:HostID:Size). With mappings, a
//!   stored id outside every range shows as the overflow id, and a chown to a shown id
//!   outside every range is EINVAL (as chown in a user namespace answers).
//! - Squashing only changes what is shown; a chown still tries to store the new owner
//!   and never fails.
//! - With `xattr_permissions`, owner, permission bits (and the type of a device the
//!   daemon could not create) live in an override xattr instead of the real inode, so
//!   an unprivileged daemon can keep root-owned and set-ID files. The real inode keeps
//!   owner access bits for the daemon itself.
//! - Override xattrs are read from every layer once the mount uses them
//!   (`xattr_permissions`, or a layer root carrying one, which is how containers/storage
//!   marks layers it extracted that way).

use super::inode::Inode;
use super::override_stat::{self, Kind, OverrideStat};
use super::{Attr, Caller, Errno, Result, Union, WithContext};
use crate::config::{IdMapping, MountConfig};
use crate::layer::Layer;
use crate::sys::{self, fs::Stat, xattr::Target};

pub(crate) struct OwnerPolicy {
    uid_map: Vec<IdMapping>,
    gid_map: Vec<IdMapping>,
    squash_uid: Option<u32>,
    squash_gid: Option<u32>,
    /// The override xattr written instead of chown/chmod (`xattr_permissions=1|2`).
    write_xattr: Option<&'static str>,
    /// Whether entries' override xattrs are consulted at all.
    read_xattrs: bool,
    overflow_uid: u32,
    overflow_gid: u32,
}

/// Stored id -> shown id. Empty `maps`: the identity.
fn forward(maps: &[IdMapping], id: u32, overflow: u32) -> u32 {
    if maps.is_empty() {
        return id;
    }
    maps.iter()
        .find(|m| id >= m.container && id - m.container < m.count)
        .map(|m| m.host.wrapping_add(id - m.container))
        .unwrap_or(overflow)
}

/// Shown id -> stored id; `None` when no range covers it.
fn backward(maps: &[IdMapping], id: u32) -> Option<u32> {
    if maps.is_empty() {
        return Some(id);
    }
    maps.iter()
        .find(|m| id >= m.host && id - m.host < m.count)
        .map(|m| m.container.wrapping_add(id - m.host))
}

fn target_stat(t: Target<'_>) -> sys::SysResult<Stat> {
    match t {
        Target::Entry(dir, name) => sys::fs::stat_at(dir, name),
        Target::Fd(fd) | Target::Open(fd) => sys::fs::fstat(fd),
    }
}

fn real_chown(t: Target<'_>, uid: Option<u32>, gid: Option<u32>) -> sys::SysResult<()> {
    match t {
        Target::Entry(dir, name) => sys::fs::chown_at(dir, name, uid, gid),
        Target::Fd(fd) | Target::Open(fd) => sys::fs::fchown(fd, uid, gid),
    }
}

fn real_chmod(t: Target<'_>, mode: u32) -> sys::SysResult<()> {
    match t {
        Target::Entry(dir, name) => sys::fs::chmod_at(dir, name, mode),
        Target::Fd(fd) | Target::Open(fd) => sys::fs::chmod_fd(fd, mode),
    }
}

/// What an override records for an entry that has none: its real attributes.
fn override_of_stat(st: &Stat) -> OverrideStat {
    OverrideStat {
        uid: st.st_uid,
        gid: st.st_gid,
        mode: st.st_mode & 0o7777,
        kind: Kind::from_mode(st.st_mode, st.st_rdev),
    }
}

impl OwnerPolicy {
    pub fn new(config: &MountConfig, layers: &[Layer]) -> OwnerPolicy {
        let write_xattr = match config.xattr_permissions {
            1 => Some(override_stat::PRIVILEGED_NAME),
            2 => Some(override_stat::CONTAINERS_NAME),
            _ => None,
        };
        let marked = layers.iter().any(|l| {
            sys::xattr::list(Target::Fd(l.root_fd()))
                .map(|names| {
                    names
                        .iter()
                        .any(|n| override_stat::is_override_name(n.as_encoded_bytes()))
                })
                .unwrap_or(false)
        });
        let (overflow_uid, overflow_gid) = sys::process::overflow_ids();
        OwnerPolicy {
            uid_map: config.uid_mappings.clone(),
            gid_map: config.gid_mappings.clone(),
            squash_uid: config.squash_to_uid,
            squash_gid: config.squash_to_gid,
            write_xattr,
            read_xattrs: write_xattr.is_some() || marked,
            overflow_uid,
            overflow_gid,
        }
    }

    /// Nothing to translate: attributes are shown and stored as they are.
    pub(crate) fn is_plain(&self) -> bool {
        self.uid_map.is_empty()
            && self.gid_map.is_empty()
            && self.squash_uid.is_none()
            && self.squash_gid.is_none()
            && !self.read_xattrs
    }

    /// Whether owners and modes are written to an override xattr.
    pub fn writes_overrides(&self) -> bool {
        self.write_xattr.is_some()
    }

    fn squashes(&self) -> bool {
        self.squash_uid.is_some() || self.squash_gid.is_some()
    }

    pub fn shown_uid(&self, stored: u32) -> u32 {
        self.squash_uid
            .unwrap_or_else(|| forward(&self.uid_map, stored, self.overflow_uid))
    }

    pub fn shown_gid(&self, stored: u32) -> u32 {
        self.squash_gid
            .unwrap_or_else(|| forward(&self.gid_map, stored, self.overflow_gid))
    }

    /// The stored owner of an entry a caller creates. A caller outside the mappings
    /// creates files owned by the overflow ids, as fuse-overlayfs does.
    pub fn stored_caller(&self, caller: Caller) -> Caller {
        Caller {
            uid: backward(&self.uid_map, caller.uid).unwrap_or(self.overflow_uid),
            gid: backward(&self.gid_map, caller.gid).unwrap_or(self.overflow_gid),
            pid: caller.pid,
        }
    }

    /// The override recorded on `t`, if the mount reads them and one is there. A value
    /// that does not parse is logged and treated as absent.
    fn read_override(&self, t: Target<'_>) -> Option<OverrideStat> {
        if !self.read_xattrs {
            return None;
        }
        let names = sys::xattr::list(t).ok()?;
        let preferred = self
            .write_xattr
            .into_iter()
            .chain(override_stat::NAMES)
            .find(|want| {
                names
                    .iter()
                    .any(|n| n.as_encoded_bytes() == want.as_bytes())
            })?;
        let value = sys::xattr::get(t, std::ffi::OsStr::new(preferred)).ok()?;
        match override_stat::parse(&value) {
            Ok(st) => Some(st),
            Err(e) => {
                log::warn!("ignoring malformed {preferred}: {e}");
                None
            }
        }
    }

    fn write_override(&self, name: &str, t: Target<'_>, st: &OverrideStat) -> sys::SysResult<()> {
        let value = override_stat::format(st);
        match sys::xattr::set(t, std::ffi::OsStr::new(name), value.as_bytes(), 0) {
            // user.* xattrs are not allowed on symlinks: their owner stays the real one,
            // as with fuse-overlayfs.
            Err(Errno::PERM)
                if target_stat(t).map(|s| s.st_mode & libc::S_IFMT) == Ok(libc::S_IFLNK) =>
            {
                Ok(())
            }
            other => other,
        }
    }

    /// The real mode an entry keeps while its shown mode lives in the override: the
    /// permission bits without set-ID, and always the owner's (the daemon's own)
    /// access, so that it can keep serving the entry.
    fn daemon_mode(kind: u32, mode: u32) -> u32 {
        let own = if kind == libc::S_IFDIR { 0o700 } else { 0o600 };
        (mode & 0o777) | own
    }

    /// `st` with the owner and permission bits its override records, if any (ids stay
    /// in the stored space).
    pub fn stored_stat(&self, t: Target<'_>, mut st: Stat) -> Stat {
        if let Some(ov) = self.read_override(t) {
            st.st_uid = ov.uid;
            st.st_gid = ov.gid;
            st.st_mode = (st.st_mode & libc::S_IFMT) | ov.mode;
        }
        st
    }

    /// Applies the override, mapping and squashing to attributes read from the layer.
    fn show(&self, attr: &mut Attr, ov: Option<OverrideStat>) {
        if let Some(ov) = ov {
            attr.uid = ov.uid;
            attr.gid = ov.gid;
            let mut kind = attr.mode & libc::S_IFMT;
            // A regular file may stand in for a special file the writer could not make.
            if let Some(k @ (Kind::Char { .. } | Kind::Block { .. } | Kind::Pipe | Kind::Socket)) =
                ov.kind
                && kind == libc::S_IFREG
            {
                kind = k.format_bits();
                attr.rdev = k.rdev();
                attr.size = 0;
            }
            attr.mode = kind | (ov.mode & 0o7777);
        }
        attr.uid = self.shown_uid(attr.uid);
        attr.gid = self.shown_gid(attr.gid);
    }

    /// Gives a freshly made entry (`t`) its stored owner and permission bits. Without
    /// an override xattr: chown, then chmod when `chmod` (chown clears set-ID bits).
    /// `stands_for` is the special file a placeholder regular file represents.
    pub fn give(
        &self,
        t: Target<'_>,
        uid: u32,
        gid: u32,
        perm: u32,
        chmod: bool,
        stands_for: Option<Kind>,
    ) -> Result<()> {
        if let Some(name) = self.write_xattr {
            let st = target_stat(t)?;
            let kind = stands_for.or_else(|| Kind::from_mode(st.st_mode, st.st_rdev));
            let real_kind = st.st_mode & libc::S_IFMT;
            if real_kind != libc::S_IFLNK {
                real_chmod(t, Self::daemon_mode(real_kind, perm))?;
            }
            return self
                .write_override(
                    name,
                    t,
                    &OverrideStat {
                        uid,
                        gid,
                        mode: perm & 0o7777,
                        kind,
                    },
                )
                .doing("writing the owner and mode override");
        }
        match real_chown(t, Some(uid), Some(gid)) {
            Err(e) if !self.squashes() => return Err(e.into()),
            _ => {}
        }
        if chmod {
            real_chmod(t, perm)?;
        }
        Ok(())
    }

    /// chown/chmod through the mount of the upper entry `t`; ids are shown ids.
    pub fn change(
        &self,
        t: Target<'_>,
        uid: Option<u32>,
        gid: Option<u32>,
        mode: Option<u32>,
    ) -> Result<()> {
        let map = |id: Option<u32>, maps: &[IdMapping]| -> Result<Option<u32>> {
            match id.map(|i| backward(maps, i)) {
                None => Ok(None),
                Some(Some(stored)) => Ok(Some(stored)),
                // Squashed: whatever was asked is accepted (and not stored).
                Some(None) if self.squashes() => Ok(None),
                Some(None) => Err(Errno::INVAL.into()),
            }
        };
        let (uid, gid) = (map(uid, &self.uid_map)?, map(gid, &self.gid_map)?);
        if let Some(name) = self.write_xattr {
            if uid.is_none() && gid.is_none() && mode.is_none() {
                return Ok(());
            }
            let st = target_stat(t)?;
            let current = self
                .read_override(t)
                .unwrap_or_else(|| override_of_stat(&st));
            let mut next = current;
            next.uid = uid.unwrap_or(current.uid);
            next.gid = gid.unwrap_or(current.gid);
            next.mode = mode.map(|m| m & 0o7777).unwrap_or(current.mode);
            if next.kind.is_none() {
                next.kind = Kind::from_mode(st.st_mode, st.st_rdev);
            }
            if let Some(m) = mode {
                let kind = st.st_mode & libc::S_IFMT;
                if kind != libc::S_IFLNK {
                    real_chmod(t, Self::daemon_mode(kind, m))?;
                }
            }
            return self
                .write_override(name, t, &next)
                .doing("writing the owner and mode override");
        }
        if uid.is_some() || gid.is_some() {
            match real_chown(t, uid, gid) {
                Err(e) if !self.squashes() => return Err(e.into()),
                _ => {}
            }
        }
        if let Some(m) = mode {
            real_chmod(t, m)?;
        }
        Ok(())
    }

    /// Owner and mode of a copy-up's staged entry `dst`, from its source `src` (whose
    /// real stat is `st`). `chmod` is false for symlinks, which have no mode of their own.
    pub fn copy(&self, src: Target<'_>, dst: Target<'_>, st: &Stat, chmod: bool) -> Result<()> {
        let mode = st.st_mode & 0o7777;
        let Some(name) = self.write_xattr else {
            real_chown(dst, Some(st.st_uid), Some(st.st_gid))?;
            if chmod {
                real_chmod(dst, mode)?;
            }
            return Ok(());
        };
        let ov = self
            .read_override(src)
            .unwrap_or_else(|| override_of_stat(st));
        // Kept where the daemon may (as root), so the copy reads the same without the
        // override too; an unprivileged daemon keeps its own.
        match real_chown(dst, Some(st.st_uid), Some(st.st_gid)) {
            Ok(()) | Err(Errno::PERM) | Err(Errno::INVAL) => {}
            Err(e) => return Err(e.into()),
        }
        if chmod {
            real_chmod(dst, Self::daemon_mode(st.st_mode & libc::S_IFMT, mode))?;
        }
        self.write_override(name, dst, &ov)
            .doing("writing the owner and mode override")
    }
}

impl Union {
    /// The attributes the kernel is shown for `inode`, given those of its real object.
    pub(crate) fn shown_attr(&self, inode: &Inode, mut attr: Attr) -> Attr {
        if self.owner.is_plain() {
            return attr;
        }
        let ov = if self.owner.read_xattrs {
            self.object_target(inode, |t| Ok(self.owner.read_override(t)))
                .ok()
                .flatten()
        } else {
            None
        };
        self.owner.show(&mut attr, ov);
        attr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(uid_map: Vec<IdMapping>, squash: Option<u32>) -> OwnerPolicy {
        OwnerPolicy {
            gid_map: uid_map.clone(),
            uid_map,
            squash_uid: squash,
            squash_gid: squash,
            write_xattr: None,
            read_xattrs: false,
            overflow_uid: 65534,
            overflow_gid: 65534,
        }
    }

    fn m(container: u32, host: u32, count: u32) -> IdMapping {
        IdMapping {
            container,
            host,
            count,
        }
    }

    #[test]
    fn mappings_translate_both_ways() {
        let p = policy(vec![m(0, 100000, 1000), m(1000, 5000, 1)], None);
        assert_eq!(p.shown_uid(0), 100000);
        assert_eq!(p.shown_uid(999), 100999);
        assert_eq!(p.shown_uid(1000), 5000);
        assert_eq!(p.shown_uid(1001), 65534, "unmapped stored id: overflow");
        assert_eq!(backward(&p.uid_map, 100005), Some(5));
        assert_eq!(backward(&p.uid_map, 5000), Some(1000));
        assert_eq!(backward(&p.uid_map, 7), None);
        let c = p.stored_caller(Caller {
            uid: 100001,
            gid: 3,
            pid: 9,
        });
        assert_eq!((c.uid, c.gid, c.pid), (1, 65534, 9));
        // Ranges ending at the top of the id space do not overflow.
        let top = policy(vec![m(u32::MAX - 1, 10, 2)], None);
        assert_eq!(top.shown_uid(u32::MAX), 11);
        assert_eq!(backward(&top.uid_map, 11), Some(u32::MAX));
    }

    #[test]
    fn no_mapping_is_the_identity_and_squash_wins() {
        let p = policy(Vec::new(), None);
        assert!(p.is_plain());
        assert_eq!(p.shown_uid(1234), 1234);
        let s = policy(vec![m(0, 1000, 1)], Some(0));
        assert_eq!(s.shown_uid(0), 0);
        assert_eq!(s.shown_gid(77), 0);
    }

    #[test]
    fn overrides_replace_owner_mode_and_stand_in_for_devices() {
        let mut p = policy(vec![m(0, 1000, 10)], None);
        p.read_xattrs = true;
        let base = Attr {
            ino: 5,
            mode: libc::S_IFREG | 0o600,
            nlink: 1,
            uid: 4242,
            gid: 4242,
            rdev: 0,
            size: 10,
            blocks: 0,
            blksize: 4096,
            atime: Default::default(),
            mtime: Default::default(),
            ctime: Default::default(),
        };
        let mut a = base;
        p.show(
            &mut a,
            Some(OverrideStat {
                uid: 0,
                gid: 2,
                mode: 0o4755,
                kind: Some(Kind::File),
            }),
        );
        assert_eq!((a.uid, a.gid, a.mode), (1000, 1002, libc::S_IFREG | 0o4755));
        let mut d = base;
        p.show(
            &mut d,
            Some(OverrideStat {
                uid: 0,
                gid: 0,
                mode: 0o666,
                kind: Some(Kind::Char { major: 1, minor: 3 }),
            }),
        );
        assert_eq!(d.mode, libc::S_IFCHR | 0o666);
        assert_eq!(d.rdev, libc::makedev(1, 3));
        // A type that contradicts the real object (not a placeholder) is not shown.
        let mut dir = base;
        dir.mode = libc::S_IFDIR | 0o700;
        p.show(
            &mut dir,
            Some(OverrideStat {
                uid: 0,
                gid: 0,
                mode: 0o755,
                kind: Some(Kind::File),
            }),
        );
        assert_eq!(dir.mode, libc::S_IFDIR | 0o755);
        // No override: only the mapping (4242 is unmapped).
        let mut plain = base;
        p.show(&mut plain, None);
        assert_eq!((plain.uid, plain.mode), (65534, libc::S_IFREG | 0o600));
    }
}
