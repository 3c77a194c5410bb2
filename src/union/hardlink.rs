//! Hard links of lower layers (kernel overlayfs `index=on` behaviour): a file with
//! several names in a lower layer stays one file after the first write through any
//! of them.
//!
//! Invariants:
//! - A lower hard-link group is either wholly below (every visible name shows the
//!   lower file, with its st_nlink less the names removed through the mount, see
//!   removed_links.rs) or wholly copied up: one upper file with one upper link per
//!   visible name, so st_nlink is the upper count at all times. Removing a name
//!   copies nothing up.
//! - The copy is published as `workdir/index/<key>` before any name links to it, and
//!   the index entry is removed only once every visible name is linked. After a
//!   crash in between, the next copy-up of any name of the group finds the index
//!   entry and links the remaining names to it instead of copying again.
//! - Names are found by one walk of the lower layer, done on the first copy-up of a
//!   multiply-linked file of that layer (or the first move of a directory with lower
//!   content); when the layer's own names do not account for the file's link count,
//!   the other lower layers on its filesystem are walked too (one file hard-linked
//!   into several image layers is one file, as with kernel overlayfs' index). A name whose path in the merged view leads elsewhere (removed or
//!   hidden) is not linked; a directory with lower content links up the groups with
//!   names inside it before it moves, so that none of their names is left behind.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, OnceLock};

use super::copy_up::CopyData;
use super::inode::{Inode, ROOT_INO};
use super::whiteout::whiteout_target;
use super::{Errno, Result, UPPER, Union, WithContext};
use crate::layer::LayerIdx;
use crate::sys::{self, fs::RenameKind, xattr::Target};

/// Lower-layer paths of every multiply-linked non-directory, by st_ino.
type Aliases = HashMap<u64, Vec<OsString>>;

pub(crate) struct AliasMaps {
    per_layer: Vec<OnceLock<Aliases>>,
}

impl AliasMaps {
    pub fn new(layers: usize) -> AliasMaps {
        AliasMaps {
            per_layer: (0..layers).map(|_| OnceLock::new()).collect(),
        }
    }
}

/// Collects the multiply-linked non-directories under `root`.
fn scan_layer(root: BorrowedFd<'_>) -> Result<Aliases> {
    let mut out = Aliases::new();
    let mut stack: Vec<(Option<OwnedFd>, OsString)> = vec![(None, OsString::new())];
    while let Some((fd, path)) = stack.pop() {
        let dir = fd.as_ref().map_or(root, |f| f.as_fd());
        for entry in sys::fs::read_dir(dir)? {
            if whiteout_target(&entry.name).is_some() {
                continue;
            }
            let st = match sys::fs::stat_at(dir, &entry.name) {
                Ok(st) => st,
                Err(_) => continue,
            };
            let child = super::redirect::join(&path, &entry.name);
            if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                if let Ok(sub) = sys::fs::open_dir(dir, &entry.name) {
                    stack.push((Some(sub), child));
                }
            } else if st.st_nlink > 1 {
                out.entry(st.st_ino).or_default().push(child);
            }
        }
    }
    Ok(out)
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
    /// Finishes the link-ups a crash interrupted (run at mount, before anything is
    /// served): an entry left in the index is a whole copy of a lower group, linked to
    /// some of its names while the others still show the lower file. Each visible name
    /// still showing the lower file is linked to the copy and the entry removed, so
    /// the group is one file with one upper link per name again. An entry whose names
    /// cannot all be handled stays for the next copy-up of the group to finish.
    pub(crate) fn finish_interrupted_link_ups(&self) -> Result<()> {
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
            if !self.is_own_index_copy(&index, &entry.name, src_layer, ino) {
                self.discard_index_entry(&index, &entry.name)?;
                continue;
            }
            // Names in every lower layer on the file's filesystem, as `copy_up_linked`
            // may have linked (only names showing this very lower file are linked).
            let dev = self.layer(src_layer)?.dev;
            let layers: Vec<LayerIdx> = self.lower_layers_on(dev).collect();
            let mut all_linked = true;
            for idx in layers {
                let paths = self.aliases(idx)?.get(&ino).cloned();
                for path in paths.unwrap_or_default() {
                    if let Err(e) = self.link_up_alias(&path, (dev, ino), idx, &index, &entry.name)
                    {
                        log::warn!("index {:?}: name {path:?} not linked: {e}", entry.name);
                        all_linked = false;
                    }
                }
            }
            if all_linked {
                sys::fs::unlink_at(index.as_fd(), &entry.name)?;
            }
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
        log::warn!("workdir/index/{key:?} is not a copy this workdir made; removed, not used");
        match sys::fs::unlink_at(index.as_fd(), key) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn aliases(&self, idx: LayerIdx) -> Result<&Aliases> {
        let slot = self.hardlinks.per_layer.get(idx).ok_or(Errno::IO)?;
        if let Some(map) = slot.get() {
            return Ok(map);
        }
        let map = scan_layer(self.layer(idx)?.root_fd())?;
        Ok(slot.get_or_init(|| map))
    }

    /// The lower layers on device `dev`: one file hard-linked into several of them is
    /// one group.
    pub(super) fn lower_layers_on(&self, dev: u64) -> impl Iterator<Item = LayerIdx> + '_ {
        (0..=self.bottom_layer())
            .filter(|i| *i != UPPER || !self.upper)
            .filter(move |i| self.layers[*i].dev == dev)
    }

    /// Copies up a lower non-directory that has other names in its layer, and links
    /// every visible name to the copy. Called with `inode.copy_up` held and the
    /// parent already copied up. Returns the source's inode flags (see `stage_copy`).
    pub(crate) fn copy_up_linked(
        &self,
        inode: &Inode,
        parent: &Inode,
        name: &OsStr,
        src_layer: LayerIdx,
        (src_ino, src_nlink): (u64, u64),
        data: CopyData,
    ) -> Result<u32> {
        let index = self.index.as_ref().ok_or(Errno::ROFS)?.clone();
        let key = index_key(self.bottom_layer() - src_layer, src_ino);
        let reuse = match sys::fs::stat_at(index.as_fd(), &key) {
            Ok(_) if self.is_own_index_copy(&index, &key, src_layer, src_ino) => true,
            Ok(_) => {
                self.discard_index_entry(&index, &key)?;
                false
            }
            Err(Errno::NOENT) => false,
            Err(e) => return Err(e.into()),
        };
        let src_dir = self.dir_fd(parent, src_layer)?;
        let mut flags = None;
        if !reuse {
            let published = self.publish_from_work(
                |work, temp| {
                    let f =
                        self.stage_copy(inode, src_dir.as_fd(), name, work, temp, data, None)?;
                    flags = Some(f);
                    Ok(())
                },
                index.as_fd(),
                &key,
                RenameKind::NoReplace,
            );
            // EXIST: another name of the group published it first.
            match published {
                Ok(()) => {}
                Err(e) if e == Errno::EXIST => {}
                Err(e) => return Err(e),
            }
        }
        let flags = match flags {
            Some(f) => f,
            None => self.lower_flags_at(src_dir.as_fd(), name)?,
        };
        // Links found in no layer are recorded with the copy, which keeps counting them.
        let lower_dev = self.layer(src_layer)?.dev;
        let names = self.group_names(src_layer, src_ino, src_nlink)?;
        let outside = u32::try_from(src_nlink.saturating_sub(names.len() as u64)).unwrap_or(0);
        if outside > 0 {
            self.set_outside_links(Target::Entry(index.as_fd(), &key), inode.ino, outside);
        }
        let copy = sys::fs::stat_at(index.as_fd(), &key)?;
        let upper = self.dir_fd(parent, UPPER)?;
        link_or_same(index.as_fd(), &key, upper.as_fd(), name, copy.st_ino)?;
        // Recorded before the layers point at the copy (see copy_up_entry).
        self.inodes.add_identity(inode, (copy.st_dev, copy.st_ino));
        {
            inode.state.write().linked_up(outside);
        }

        for (idx, path) in names {
            if let Err(e) = self.link_up_alias(&path, (lower_dev, src_ino), idx, &index, &key) {
                log::warn!("copy-up: name {path:?} of a hard-linked file not linked: {e}");
            }
        }
        sys::fs::unlink_at(index.as_fd(), &key)?;
        // The copy counts the group's links from now on.
        self.forget_removed_links(lower_dev, src_ino);
        Ok(flags)
    }

    /// The names of lower object `src_ino` of `src_layer` (link count `src_nlink`) in
    /// the lower layers: those in its own layer and, when they do not account for its
    /// link count, those in the other lower layers on its filesystem (hard-link dedup
    /// of image layers puts one file into several), so that every name of the file
    /// stays one file, as with kernel overlayfs' index.
    fn group_names(
        &self,
        src_layer: LayerIdx,
        src_ino: u64,
        src_nlink: u64,
    ) -> Result<Vec<(LayerIdx, OsString)>> {
        let lower_dev = self.layer(src_layer)?.dev;
        let own = self.aliases(src_layer)?.get(&src_ino).map_or(0, Vec::len) as u64;
        let layers: Vec<LayerIdx> = if own < src_nlink {
            self.lower_layers_on(lower_dev).collect()
        } else {
            vec![src_layer]
        };
        let mut names = Vec::new();
        for idx in layers {
            for path in self
                .aliases(idx)?
                .get(&src_ino)
                .cloned()
                .unwrap_or_default()
            {
                names.push((idx, path));
            }
        }
        Ok(names)
    }

    /// Links the index copy at `path` when that path of the merged view still shows
    /// the lower object `lower`.
    fn link_up_alias(
        &self,
        path: &OsStr,
        lower: (u64, u64),
        src_layer: LayerIdx,
        index: &Arc<OwnedFd>,
        key: &OsStr,
    ) -> Result<()> {
        self.at_lower_alias(path, lower, src_layer, |dir, last, _| {
            self.copy_up(dir, CopyData::Yes)?;
            let upper = self.dir_fd(dir, UPPER)?;
            let copy = sys::fs::stat_at(index.as_fd(), key)?;
            link_or_same(index.as_fd(), key, upper.as_fd(), last, copy.st_ino)
                .doing("linking a name of a hard-linked file to its copy")
        })
    }

    /// Before a directory with lower content moves, the names inside it stop being
    /// at their layer paths, where a later group link-up looks for them: so every
    /// not yet copied-up hard-link group with a name inside it is linked up first.
    pub(crate) fn link_up_groups_under(&self, dir: &Inode) -> Result<()> {
        let prefix = super::redirect::join(&self.lower_path(dir)?, OsStr::new(""));
        let layers = dir.state.read().layer_indexes();
        for idx in layers.into_iter().filter(|i| *i != UPPER || !self.upper) {
            let dev = self.layer(idx)?.dev;
            let inside: Vec<(u64, OsString)> = self
                .aliases(idx)?
                .iter()
                .flat_map(|(ino, paths)| paths.iter().map(move |p| (*ino, p.clone())))
                .filter(|(_, p)| p.as_bytes().starts_with(prefix.as_bytes()))
                .collect();
            for (ino, path) in inside {
                self.at_lower_alias(&path, (dev, ino), idx, |parent, last, found| {
                    let inode = self.adopt(parent.ino, last, found)?;
                    let copied = self.copy_up(&inode, CopyData::Yes);
                    self.inodes.forget(inode.ino, 1);
                    copied
                })?;
            }
        }
        Ok(())
    }

    /// Calls `f(parent, name, found)` when `path` of the merged view shows the lower
    /// object `lower` of layer `src_layer`; does nothing otherwise.
    pub(crate) fn at_lower_alias(
        &self,
        path: &OsStr,
        lower: (u64, u64),
        src_layer: LayerIdx,
        f: impl FnOnce(&Arc<Inode>, &OsStr, super::lookup::Found) -> Result<()>,
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

/// Links `from_dir/from` as `to_dir/to`; a link already there to the same object
/// (a link-up interrupted after this step) counts as done.
fn link_or_same(
    from_dir: BorrowedFd<'_>,
    from: &OsStr,
    to_dir: BorrowedFd<'_>,
    to: &OsStr,
    ino: u64,
) -> sys::SysResult<()> {
    match sys::fs::link_at(from_dir, from, to_dir, to) {
        Err(Errno::EXIST) if sys::fs::stat_at(to_dir, to).map(|s| s.st_ino) == Ok(ino) => Ok(()),
        other => other,
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
