//! Hard links of lower layers (kernel overlayfs `index=on` behaviour): a file with
//! several names in the lower layers stays one file after the first write through
//! any of them, and no step needs to know where its other names are.
//!
//! Invariants:
//! - A lower hard-link group is copied up once, into the index
//!   (`workdir/#stratafs-index/<key>`, [`index_key`] of the name copied: its layer
//!   from the bottom and its lower st_ino), and stays there: the index entry is one
//!   link of the copy. The copy is staged with its origin marker (origin.rs), which
//!   holds the st_nlink shown less the copy's own, so publishing it is one rename
//!   and the group's count is right at every step after it.
//! - A name of the group is linked to the copy when it is next reached: by the
//!   copy-up that made the copy, and by any lookup, removal or rename that finds a
//!   lower non-directory whose (st_dev, st_ino) has an index entry
//!   ([`Union::resolve_linking`]). Names are thus found where they are now, also
//!   inside moved directories, and no layer is ever walked for them. Each link takes
//!   one from the marker (the copy got a link, the names shown did not change).
//! - The shown st_nlink never changes at copy-up: before it, the lower count less
//!   the names removed through the mount (removed_links.rs); after it, the copy's
//!   count plus its marker, which started from that same number.
//! - `IndexedGroups::link_up` is held over each link of a name and the marker update
//!   that counts it, so concurrent link-ups of a group count once each. A crash
//!   between the two leaves the group's count one too high (the link is there, its
//!   marker update is not); kernel overlayfs has the same window. Data and names are
//!   never lost by it.
//! - Index entries are read at mount and trusted only once checked to be a regular
//!   file carrying the marker of the lower object they are named for; anything else
//!   there (planted, or left by another tool) is removed, never linked into the
//!   upper layer.
//! - On a read-only mount nothing is linked: a name not linked yet still shows the
//!   lower file. Known gap: kernel overlayfs shows the copy there, which needs an
//!   inode served from the index rather than from a name in a layer.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::{Mutex, RwLock};

use super::copy_up::CopyData;
use super::inode::{Inode, ROOT_INO};
use super::lookup::Found;
use super::{Errno, Result, UPPER, Union, WithContext};
use crate::layer::LayerIdx;
use crate::sys::{self, fs::RenameKind, xattr::Target};

/// The work directory's subdirectory holding the copies of lower hard-link groups.
/// Not kernel overlayfs' `index`: the kernel refuses to mount (index=on) over index
/// entries it cannot read as its own.
pub(crate) const INDEX_DIR: &str = "#stratafs-index";

/// The copied-up lower hard-link groups of this mount's index.
#[derive(Default)]
pub(crate) struct IndexedGroups {
    /// By the lower object's (st_dev, st_ino): one file hard-linked into several
    /// lower layers of one filesystem is one group.
    groups: RwLock<HashMap<(u64, u64), IndexEntry>>,
    /// Whether `groups` may hold anything: the lookups of multiply-linked lower
    /// files take no lock while the index is empty.
    any: AtomicBool,
    /// Held over one name's link to a copy and the marker update counting it. Taken
    /// with no lock of the engine held but directory copy-up locks released and
    /// before any inode's state (see the LOCKING list in mod.rs).
    link_up: Mutex<()>,
}

#[derive(Clone)]
pub(crate) struct IndexEntry {
    key: OsString,
    src_layer: LayerIdx,
    /// Checked to be a copy this workdir made (see `is_own_index_copy`).
    checked: bool,
}

impl IndexedGroups {
    fn insert(&self, lower: (u64, u64), entry: IndexEntry) {
        self.groups.write().insert(lower, entry);
        self.any.store(true, Ordering::Release);
    }
}

/// The index name of a lower object: its layer counted from the bottom (stable while
/// the layer list is) and its inode number.
pub(super) fn index_key(layer_from_bottom: usize, ino: u64) -> OsString {
    format!("L{layer_from_bottom}-{ino:x}").into()
}

/// The layer (from the bottom) and inode number an index name stands for.
pub(super) fn parse_index_key(key: &OsStr) -> Option<(usize, u64)> {
    let (layer, ino) = std::str::from_utf8(key.as_bytes())
        .ok()?
        .strip_prefix('L')?
        .split_once('-')?;
    Some((layer.parse().ok()?, u64::from_str_radix(ino, 16).ok()?))
}

impl Union {
    /// Reads the index at mount: every entry stands for a copied-up group whose names
    /// are linked to it as they are reached. Entries are checked at first use; an
    /// entry no name shows any more (its only link is the index's and its marker
    /// counts no other name) is removed, as kernel overlayfs cleans its index.
    pub(crate) fn load_index(&self) -> Result<()> {
        let Some(index) = self.index.clone() else {
            return Ok(());
        };
        for entry in sys::fs::read_dir(index.as_fd())? {
            let Some((from_bottom, ino)) = parse_index_key(&entry.name) else {
                continue;
            };
            let Some(src_layer) = self.bottom_layer().checked_sub(from_bottom) else {
                continue;
            };
            if src_layer == UPPER && self.upper {
                continue;
            }
            if self.is_orphan_copy(&index, &entry.name) {
                log::debug!("{INDEX_DIR}/{:?}: no name left; removed", entry.name);
                sys::fs::unlink_at(index.as_fd(), &entry.name)?;
                continue;
            }
            let dev = self.layer(src_layer)?.dev;
            self.indexed.insert(
                (dev, ino),
                IndexEntry {
                    key: entry.name,
                    src_layer,
                    checked: false,
                },
            );
        }
        Ok(())
    }

    /// Whether index entry `key` is a copy of ours that no name shows: the index
    /// holds its only link and its marker counts no name beyond it.
    fn is_orphan_copy(&self, index: &OwnedFd, key: &OsStr) -> bool {
        let alone = sys::fs::stat_at(index.as_fd(), key)
            .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_nlink == 1);
        alone
            && self
                .origin(Target::Entry(index.as_fd(), key))
                // Shown: the index's link plus the marker.
                .is_some_and(|o| o.nlink_adjust < 0)
    }

    /// The index entry of the group of lower object `lower` (st_dev, st_ino), if it
    /// was copied up and the entry is one of ours (an entry that is not is removed
    /// here).
    fn indexed_copy(&self, lower: (u64, u64)) -> Option<IndexEntry> {
        if !self.indexed.any.load(Ordering::Acquire) {
            return None;
        }
        let entry = self.indexed.groups.read().get(&lower).cloned()?;
        if entry.checked {
            return Some(entry);
        }
        let index = self.index.as_ref()?;
        let own = self.is_own_index_copy(index, &entry.key, entry.src_layer, lower.1);
        let mut groups = self.indexed.groups.write();
        if own {
            if let Some(e) = groups.get_mut(&lower) {
                e.checked = true;
            }
            return Some(IndexEntry {
                checked: true,
                ..entry
            });
        }
        groups.remove(&lower);
        drop(groups);
        if let Err(e) = self.discard_index_entry(index, &entry.key) {
            log::warn!("removing {INDEX_DIR}/{:?}: {e}", entry.key);
        }
        None
    }

    /// [`Union::resolve`] for a step that acts on the name found: a name of a
    /// copied-up lower hard-link group is linked to the group's copy first, so that
    /// it shows (and the step changes) the one file the group is.
    pub(crate) fn resolve_linking(&self, parent: &Inode, name: &OsStr) -> Result<Option<Found>> {
        let found = self.resolve(parent, name)?;
        let Some(entry) = found.as_ref().and_then(|f| self.group_copy_of(f)) else {
            return Ok(found);
        };
        if self.check_writable().is_err() {
            return Ok(found);
        }
        self.link_indexed_name(parent, name, &entry, None)
            .doing("linking a name of a hard-linked file to its copy")?;
        self.resolve(parent, name)
    }

    /// After a copy-up of the inode `parent/name` resolved to (`found`), which went
    /// through whichever name the inode was last reached by: links `parent/name` to
    /// the copy too when it is a name of a lower hard-link group, so that a step on
    /// that very name (a rename) finds it in the upper layer.
    pub(crate) fn link_group_name(
        &self,
        parent: &Inode,
        name: &OsStr,
        found: &Found,
    ) -> Result<()> {
        if self.is_lower_group_name(found) {
            self.resolve_linking(parent, name)?;
        }
        Ok(())
    }

    /// Whether `found` is a lower non-directory of a group already copied up: its
    /// name must be reached through [`Union::resolve_linking`].
    pub(crate) fn is_indexed(&self, found: &Found) -> bool {
        self.group_copy_of(found).is_some()
    }

    fn is_lower_group_name(&self, found: &Found) -> bool {
        found.kind != libc::S_IFDIR
            && !(self.upper && found.top_layer() == UPPER)
            && found.stat.st_nlink > 1
    }

    /// The index entry of the group `found` is a lower name of, if it was copied up.
    fn group_copy_of(&self, found: &Found) -> Option<IndexEntry> {
        if !self.is_lower_group_name(found) {
            return None;
        }
        self.indexed_copy((found.stat.st_dev, found.stat.st_ino))
    }

    /// Links `parent/name` (copying `parent` up) to the group's copy in the index and
    /// takes the link off the copy's marker; a name already linked counts as done.
    /// `copying`, the inode being copied up through that name, gets the copy's
    /// identity before the name leads to it (see copy_up_entry). The group's inode,
    /// when there is one, shows the new marker at once.
    fn link_indexed_name(
        &self,
        parent: &Inode,
        name: &OsStr,
        entry: &IndexEntry,
        copying: Option<&Inode>,
    ) -> Result<()> {
        self.copy_up(parent, CopyData::Yes)?;
        let upper = self.dir_fd(parent, UPPER)?;
        let index = self.index.as_ref().ok_or(Errno::ROFS)?;
        let key = entry.key.as_os_str();
        let _serial = self.indexed.link_up.lock();
        let copy = sys::fs::stat_at(index.as_fd(), key)?;
        if let Some(inode) = copying {
            self.inodes.add_identity(inode, (copy.st_dev, copy.st_ino));
        }
        let linked = link_or_same(index.as_fd(), key, upper.as_fd(), name, copy.st_ino)?;
        let marker = Target::Entry(index.as_fd(), key);
        let origin = self.origin(marker).ok_or(Errno::IO)?;
        let mut adjust = origin.nlink_adjust;
        if linked {
            adjust -= 1;
            if let Err(e) = self.set_nlink_adjust(marker, origin.ino, adjust) {
                log::warn!(
                    "{}: link count of a hard-linked file not recorded: {e}",
                    self.describe(parent.ino, Some(name))
                );
            }
        }
        if let Some(group) = self.inodes.by_identity((copy.st_dev, copy.st_ino)) {
            group.state.write().set_nlink_adjust(adjust);
        }
        Ok(())
    }

    /// Whether index entry `key` is a copy this workdir made of lower object `ino`
    /// of layer `src_layer`: a regular file (not a symlink or anything else planted
    /// there) carrying the origin marker its copy-up gave it. Anything else in the
    /// index is not trusted: linking it into the upper layer would hand users a file
    /// from outside the layers.
    fn is_own_index_copy(
        &self,
        index: &OwnedFd,
        key: &OsStr,
        src_layer: LayerIdx,
        ino: u64,
    ) -> bool {
        let regular = sys::fs::stat_at(index.as_fd(), key)
            .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG);
        regular
            && self.origin_ino(Target::Entry(index.as_fd(), key))
                == Some(self.derived_ino(src_layer, ino))
    }

    /// Removes an index entry that is not a copy of ours (only that name goes; a
    /// hard link elsewhere is untouched).
    fn discard_index_entry(&self, index: &OwnedFd, key: &OsStr) -> Result<()> {
        log::warn!(
            "workdir/{INDEX_DIR}/{key:?} is not a copy this workdir made; removed, not used"
        );
        match sys::fs::unlink_at(index.as_fd(), key) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The lower layers on device `dev`: one file hard-linked into several of them is
    /// one group.
    pub(super) fn lower_layers_on(&self, dev: u64) -> impl Iterator<Item = LayerIdx> + '_ {
        (0..=self.bottom_layer())
            .filter(|i| *i != UPPER || !self.upper)
            .filter(move |i| self.layers[*i].dev == dev)
    }

    /// Copies up a lower non-directory with several links (`shown_nlink` shown) into
    /// the index, unless its group is there already, and links `name` to the copy.
    /// Called with `inode.copy_up` held and the parent already copied up. Returns
    /// the source's inode flags (see `stage_copy`).
    pub(crate) fn copy_up_linked(
        &self,
        inode: &Inode,
        parent: &Inode,
        name: &OsStr,
        src_layer: LayerIdx,
        (src_ino, shown_nlink): (u64, u64),
        data: CopyData,
    ) -> Result<u32> {
        let index = self.index.as_ref().ok_or(Errno::ROFS)?.clone();
        let lower_dev = self.layer(src_layer)?.dev;
        let src_dir = self.dir_fd(parent, src_layer)?;
        let mut flags = None;
        let entry = match self.indexed_copy((lower_dev, src_ino)) {
            Some(entry) => entry,
            None => {
                let key = index_key(self.bottom_layer() - src_layer, src_ino);
                // Made meanwhile through a name with an inode of its own (split off),
                // or planted: only our own copy is used.
                let made = match sys::fs::stat_at(index.as_fd(), &key) {
                    Ok(_) if self.is_own_index_copy(&index, &key, src_layer, src_ino) => true,
                    Ok(_) => {
                        self.discard_index_entry(&index, &key)?;
                        false
                    }
                    Err(Errno::NOENT) => false,
                    Err(e) => return Err(e.into()),
                };
                // Shown count = the copy's one link (the index entry) + the marker.
                let adjust = i64::try_from(shown_nlink).unwrap_or(i64::MAX) - 1;
                let published = match made {
                    true => Ok(()),
                    false => self.publish_from_work(
                        |work, temp| {
                            let f = self.stage_copy(
                                inode,
                                src_dir.as_fd(),
                                name,
                                work,
                                temp,
                                data,
                                None,
                            )?;
                            flags = Some(f);
                            self.set_nlink_adjust(Target::Entry(work, temp), inode.ino, adjust)
                                .doing("recording the link count of a hard-linked file's copy")?;
                            Ok(())
                        },
                        index.as_fd(),
                        &key,
                        RenameKind::NoReplace,
                    ),
                };
                match published {
                    Ok(()) => {}
                    Err(e)
                        if e == Errno::EXIST
                            && self.is_own_index_copy(&index, &key, src_layer, src_ino) => {}
                    Err(e) => return Err(e),
                }
                let entry = IndexEntry {
                    key,
                    src_layer,
                    checked: true,
                };
                self.indexed.insert((lower_dev, src_ino), entry.clone());
                // The copy's marker counts the group's links from now on.
                self.forget_removed_links(lower_dev, src_ino);
                entry
            }
        };
        let flags = match flags {
            Some(f) => f,
            None => self.lower_flags_at(src_dir.as_fd(), name)?,
        };
        self.link_indexed_name(parent, name, &entry, Some(inode))?;
        inode.state.write().file_copied_up(None);
        Ok(flags)
    }

    /// Calls `f(parent, name, found)` when `path` of the merged view shows the lower
    /// object `lower` of layer `src_layer`; does nothing otherwise.
    pub(crate) fn at_lower_alias(
        &self,
        path: &OsStr,
        lower: (u64, u64),
        src_layer: LayerIdx,
        f: impl FnOnce(&Arc<Inode>, &OsStr, Found) -> Result<()>,
    ) -> Result<()> {
        let comps: Vec<&OsStr> = path
            .as_bytes()
            .split(|b| *b == b'/')
            .filter(|c| !c.is_empty())
            .map(OsStr::from_bytes)
            .collect();
        let Some((last, dirs)) = comps.split_last() else {
            return Ok(());
        };
        // Each directory adopted on the way holds a reference, dropped at the end.
        let mut held: Vec<Arc<Inode>> = Vec::new();
        let result = (|| {
            let mut cur = self.inode(ROOT_INO)?;
            for comp in dirs {
                let Some(found) = self.resolve(&cur, comp)? else {
                    return Ok(());
                };
                if found.kind != libc::S_IFDIR {
                    return Ok(());
                }
                let next = self.adopt(cur.ino, comp, found)?;
                held.push(next.clone());
                cur = next;
            }
            let Some(found) = self.resolve(&cur, last)? else {
                return Ok(());
            };
            let shows_lower =
                found.top_layer() == src_layer && (found.stat.st_dev, found.stat.st_ino) == lower;
            if !shows_lower {
                return Ok(());
            }
            f(&cur, last, found)
        })();
        for inode in held {
            self.inodes.forget(inode.ino, 1);
        }
        result
    }
}

/// Links `from_dir/from` as `to_dir/to`: `true` when linked now, `false` when a
/// link to the same object was there already (another step linked that name).
fn link_or_same(
    from_dir: BorrowedFd<'_>,
    from: &OsStr,
    to_dir: BorrowedFd<'_>,
    to: &OsStr,
    ino: u64,
) -> sys::SysResult<bool> {
    match sys::fs::link_at(from_dir, from, to_dir, to) {
        Ok(()) => Ok(true),
        Err(Errno::EXIST) if sys::fs::stat_at(to_dir, to).map(|s| s.st_ino) == Ok(ino) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_keys_name_layer_and_inode() {
        assert_eq!(index_key(0, 255), OsString::from("L0-ff"));
        assert_ne!(index_key(1, 255), index_key(0, 255));
        assert_eq!(parse_index_key(&index_key(3, 0xabc)), Some((3, 0xabc)));
        assert_eq!(parse_index_key(OsStr::new("#stray")), None);
    }
}
