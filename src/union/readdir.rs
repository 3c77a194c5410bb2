//! Merged directory listings.
//!
//! Invariants:
//! - Each name appears once, from the highest layer that has it; whiteouts (both
//!   formats), the opaque marker and every `.wh.*` name are never listed; a whiteout
//!   hides the name only in the layers below its own.
//! - A listing is a snapshot taken at the handle's first read (and again on a
//!   rewind to offset 0); the offset of an entry is its position in the snapshot, so
//!   offsets are stable for the life of the handle and a directory changed while
//!   being read can neither loop nor skip entries of the snapshot.
//! - opendir lists nothing: the kernel serves most reads of a directory it has
//!   listed once from its own cache (FOPEN_CACHE_DIR) and then opens and releases
//!   the directory without reading it, so a snapshot taken at open would be work
//!   for nothing (warm walks and `git status` open every directory).

use std::collections::HashSet;
use std::ffi::OsString;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::inode::Inode;
use super::whiteout::{OPAQUE_MARKER, is_whiteout_stat, whiteout_target};
use super::{Attr, Errno, Ino, Result, UPPER, Union, WithContext};
use crate::sys;

#[derive(Debug, Clone)]
pub struct DirEntry {
    pub ino: Ino,
    /// Offset of the entry after this one: what the kernel passes to continue.
    pub next_offset: u64,
    /// S_IFMT bits.
    pub kind: u32,
    pub name: OsString,
    /// The lower layer a union listing found a non-directory in, with no whiteout
    /// and no other entry of that name above it (see `Union::lookup_listed`).
    pub(crate) listed_in: Option<usize>,
}

pub struct DirHandle {
    pub ino: Ino,
    /// None until the first read.
    entries: Mutex<Option<Arc<Vec<DirEntry>>>>,
}

/// A name found in one layer while merging.
struct Merged {
    name: OsString,
    kind: u32,
    real_ino: u64,
    layer: usize,
}

/// The `.` and `..` entries every listing starts with (offsets 1 and 2).
pub(crate) fn dot_entries(inode: &Inode) -> Vec<DirEntry> {
    let parent = inode.state.read().parent();
    vec![
        DirEntry {
            ino: inode.ino,
            next_offset: 1,
            kind: libc::S_IFDIR,
            name: ".".into(),
            listed_in: None,
        },
        DirEntry {
            ino: parent,
            next_offset: 2,
            kind: libc::S_IFDIR,
            name: "..".into(),
            listed_in: None,
        },
    ]
}

impl Union {
    /// Lists the merged directory, `.` and `..` excluded.
    fn merge_listing(&self, inode: &Inode) -> Result<Vec<Merged>> {
        let refs = inode.state.read().layer_indexes();
        let mut seen: HashSet<OsString> = HashSet::new();
        let mut out = Vec::new();
        for idx in refs {
            let fd = self.dir_fd(inode, idx)?;
            // Whiteouts of this layer hide names of the layers below only.
            let mut hidden_below = Vec::new();
            let listing = sys::fs::read_dir(fd.as_fd())
                .doing("listing a directory")
                .in_layer_of(self, idx)?;
            for raw in listing {
                if raw.name == OPAQUE_MARKER {
                    continue;
                }
                if let Some(target) = whiteout_target(&raw.name) {
                    hidden_below.push(target.to_os_string());
                    continue;
                }
                if raw.name.as_encoded_bytes().starts_with(b".wh.") {
                    continue;
                }
                let mut kind = raw.kind;
                if kind == 0 || kind == libc::S_IFCHR {
                    match sys::fs::stat_at(fd.as_fd(), &raw.name) {
                        Ok(st) if is_whiteout_stat(st.st_mode, st.st_rdev) => {
                            hidden_below.push(raw.name);
                            continue;
                        }
                        Ok(st) => kind = st.st_mode & libc::S_IFMT,
                        Err(_) => continue, // vanished while listing
                    }
                }
                if seen.insert(raw.name.clone()) {
                    out.push(Merged {
                        name: raw.name,
                        kind,
                        real_ino: raw.ino,
                        layer: idx,
                    });
                }
            }
            seen.extend(hidden_below);
        }
        Ok(out)
    }

    /// Whether the merged directory has no entries.
    pub(crate) fn is_empty_dir(&self, inode: &Inode) -> Result<bool> {
        Ok(self.merge_listing(inode)?.is_empty())
    }

    /// [`Union::snapshot`] of a merged directory.
    pub(crate) fn merged_snapshot(&self, inode: &Inode) -> Result<Vec<DirEntry>> {
        let mut entries = dot_entries(inode);
        // Upper entries here may carry an origin number: in a directory merged with
        // lower layers (copy-ups land there) or one marked impure.
        // The state lock is not held across dir_fd, which takes it again: a recursive
        // read behind a queued writer would deadlock.
        let top = inode.state.read().top_layer();
        let upper_fd = match top {
            Some(UPPER) if self.upper => Some(self.dir_fd(inode, UPPER)?),
            _ => None,
        };
        let origins_in = upper_fd
            .as_ref()
            .filter(|fd| inode.state.read().merges_layers() || self.is_impure(fd.as_fd()));
        for m in self.merge_listing(inode)? {
            let dev = self.layer(m.layer)?.dev;
            // d_ino must equal the st_ino a lookup gives: the live inode's number when
            // the object is known, else the same derivation lookup uses.
            let ino = match (self.inodes.by_identity((dev, m.real_ino)), origins_in) {
                (Some(i), _) => i.ino,
                (None, Some(fd)) if m.layer == UPPER => {
                    self.upper_entry_ino(fd.as_fd(), &m.name, m.real_ino)
                }
                (None, _) => self.derived_ino(m.layer, m.real_ino),
            };
            let next_offset = entries.len() as u64 + 1;
            let listed_in = (m.layer != UPPER && m.kind != libc::S_IFDIR).then_some(m.layer);
            entries.push(DirEntry {
                ino,
                next_offset,
                kind: m.kind,
                name: m.name,
                listed_in,
            });
        }
        self.graft_fix_listing(inode.ino, &mut entries);
        Ok(entries)
    }

    pub fn opendir(&self, ino: Ino) -> Result<u64> {
        let inode = self.inode(ino)?;
        if !inode.is_dir() {
            return Err(Errno::NOTDIR.into());
        }
        let fh = self.new_handle();
        self.dirs.insert(
            fh,
            Arc::new(DirHandle {
                ino,
                entries: Mutex::new(None),
            }),
        );
        Ok(fh)
    }

    /// The handle's snapshot. The first read and a rewind (offset 0) take a fresh
    /// one. The lock is not held while listing, which takes inode locks.
    pub fn readdir(&self, fh: u64, offset: u64) -> Result<Arc<Vec<DirEntry>>> {
        let handle = self
            .dirs
            .get(&fh)
            .map(|h| h.value().clone())
            .ok_or(Errno::BADF)?;
        if offset != 0 {
            if let Some(entries) = handle.entries.lock().clone() {
                return Ok(entries);
            }
        }
        let inode = self.inode(handle.ino)?;
        let fresh = Arc::new(self.snapshot(&inode)?);
        *handle.entries.lock() = Some(fresh.clone());
        Ok(fresh)
    }

    /// Hands the entries of directory handle `fh` from `offset` on to `add`, until
    /// `add` says the reply is full (returns true). Offsets are the engine's: an
    /// entry's `next_offset` is where the next call resumes.
    pub fn readdir_into(
        &self,
        fh: u64,
        offset: u64,
        mut add: impl FnMut(&DirEntry) -> bool,
    ) -> Result<()> {
        let entries = self.readdir(fh, offset)?;
        for e in entries.iter().skip(offset as usize) {
            if add(e) {
                break;
            }
        }
        Ok(())
    }

    /// readdirplus of the directory `dir` through handle `fh`: as
    /// [`Union::readdir_into`], each entry with its attributes and their cache
    /// lifetime. Every entry but `.` and `..` is looked up, since the kernel takes a
    /// reference on each one it is sent; the entry that no longer fits gives its
    /// reference back. An entry gone since the snapshot is left out.
    pub fn readdirplus_into(
        &self,
        dir: Ino,
        fh: u64,
        offset: u64,
        mut add: impl FnMut(&DirEntry, &Attr, Duration) -> bool,
    ) -> Result<()> {
        let entries = self.readdir(fh, offset)?;
        for e in entries.iter().skip(offset as usize) {
            let looked_up = if e.name == "." || e.name == ".." {
                // Not counted by the kernel: no reference taken.
                self.getattr(if e.name == "." { dir } else { e.ino })
                    .or_else(|_| self.getattr(dir))
                    .map(|a| (a, self.attr_ttl(a.ino), false))
            } else {
                self.lookup_listed(dir, e).map(|en| (en.attr, en.ttl, true))
            };
            let Ok((attr, ttl, counted)) = looked_up else {
                continue;
            };
            if add(e, &attr, ttl) {
                if counted {
                    self.forget(attr.ino, 1);
                }
                break;
            }
        }
        Ok(())
    }

    pub fn releasedir(&self, fh: u64) {
        self.dirs.remove(&fh);
    }
}
