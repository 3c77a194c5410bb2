//! Name resolution across layers (the kernel's namei.c): upper first, then the lowers
//! top-down; a whiteout stops the search, a non-directory hides everything below it,
//! an opaque directory hides the directories below it.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::inode::{Inode, InodeState, LayerRef, ROOT_INO};
use super::whiteout::{self, is_whiteout_stat};
use super::{Attr, Entry, Errno, Ino, Result, Union, attr_from_stat};
use crate::layer::LayerIdx;
use crate::sys::{self, fs::Stat};

/// What a name resolves to in the merged view.
pub(crate) struct Found {
    pub kind: u32,
    /// The top-most layer's stat: the one the merged entry shows.
    pub stat: Stat,
    /// Directories: every merged layer, each with an open handle. Non-directories: one.
    pub layers: Vec<LayerRef>,
}

impl Found {
    pub fn top_layer(&self) -> LayerIdx {
        self.layers.first().map(|l| l.layer).unwrap_or(0)
    }
}

/// Why a layer stopped the search for a name.
enum Probe {
    Entry(Stat),
    Missing,
    WhitedOut,
}

/// Looks for `name` in one layer's copy of a directory.
fn probe(dir: &OwnedFd, name: &OsStr) -> Result<Probe> {
    match sys::fs::stat_at(dir.as_fd(), name) {
        Ok(st) if is_whiteout_stat(st.st_mode, st.st_rdev) => Ok(Probe::WhitedOut),
        Ok(st) => Ok(Probe::Entry(st)),
        Err(Errno::NOENT) => {
            // AUFS-format whiteout; a name too long to carry the prefix has none.
            match sys::fs::stat_at(dir.as_fd(), &whiteout::whiteout_name(name)) {
                Ok(_) => Ok(Probe::WhitedOut),
                Err(_) => Ok(Probe::Missing),
            }
        }
        Err(e) => Err(e),
    }
}

/// Checks a name received from the kernel before it is used on a layer.
pub(crate) fn check_name(name: &OsStr) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    if name.len() > 255 {
        return Err(Errno::NAMETOOLONG);
    }
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
        return Err(Errno::INVAL);
    }
    Ok(())
}

impl Union {
    /// An O_PATH handle on `inode`'s directory in layer `idx`: the cached one, or one
    /// re-opened from the parent's (cached when the fd budget allows).
    pub(crate) fn dir_fd(&self, inode: &Inode, idx: LayerIdx) -> Result<Arc<OwnedFd>> {
        let (parent, name) = {
            let st = inode.state.read();
            let r = st
                .layers
                .iter()
                .find(|l| l.layer == idx)
                .ok_or(Errno::NOENT)?;
            if let Some(fd) = &r.fd {
                return Ok(fd.clone());
            }
            (st.parent, st.name.clone())
        };
        if inode.ino == ROOT_INO {
            return Ok(self.layer(idx)?.root.clone());
        }
        let p = self.inode(parent)?;
        let pfd = self.dir_fd(&p, idx)?;
        let fd = Arc::new(sys::fs::open_dir(pfd.as_fd(), &name)?);
        if self.inodes.dir_fds.load(Ordering::Relaxed) < self.dir_fd_budget {
            let mut st = inode.state.write();
            if let Some(r) = st.layers.iter_mut().find(|l| l.layer == idx) {
                if r.fd.is_none() {
                    r.fd = Some(fd.clone());
                    self.inodes.dir_fds.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(fd)
    }

    /// Where a non-directory lives: its parent's directory in the entry's layer, and
    /// its name there.
    pub(crate) fn entry_loc(&self, inode: &Inode) -> Result<(Arc<OwnedFd>, OsString, LayerIdx)> {
        let (parent, name, layer) = {
            let st = inode.state.read();
            if st.detached {
                return Err(Errno::NOENT);
            }
            (
                st.parent,
                st.name.clone(),
                st.top_layer().ok_or(Errno::NOENT)?,
            )
        };
        let p = self.inode(parent)?;
        let pfd = self.dir_fd(&p, layer)?;
        Ok((pfd, name, layer))
    }

    /// Resolves `name` in the merged directory `parent`; `None` when it does not exist.
    pub(crate) fn resolve(&self, parent: &Inode, name: &OsStr) -> Result<Option<Found>> {
        let refs: Vec<LayerIdx> = parent.state.read().layers.iter().map(|l| l.layer).collect();
        let last = refs.len().saturating_sub(1);
        let mut found: Option<Found> = None;
        for (pos, idx) in refs.into_iter().enumerate() {
            let pfd = self.dir_fd(parent, idx)?;
            let st = match probe(&pfd, name)? {
                Probe::WhitedOut => break,
                Probe::Missing => continue,
                Probe::Entry(st) => st,
            };
            let kind = st.st_mode & libc::S_IFMT;
            if kind != libc::S_IFDIR {
                if found.is_none() {
                    found = Some(Found {
                        kind,
                        stat: st,
                        layers: vec![LayerRef {
                            layer: idx,
                            fd: None,
                        }],
                    });
                }
                break;
            }
            let fd = Arc::new(sys::fs::open_dir(pfd.as_fd(), name)?);
            let opaque = pos < last && whiteout::dir_is_opaque(fd.as_fd())?;
            let r = LayerRef {
                layer: idx,
                fd: Some(fd),
            };
            match &mut found {
                None => {
                    found = Some(Found {
                        kind,
                        stat: st,
                        layers: vec![r],
                    })
                }
                Some(f) => f.layers.push(r),
            }
            if opaque {
                break;
            }
        }
        Ok(found)
    }

    /// Whether `name` exists in the layers of `parent` below the upper one, i.e.
    /// whether removing or moving the upper entry must leave a whiteout.
    pub(crate) fn lower_has(&self, parent: &Inode, name: &OsStr) -> Result<bool> {
        let refs: Vec<LayerIdx> = parent.state.read().layers.iter().map(|l| l.layer).collect();
        for idx in refs
            .into_iter()
            .filter(|i| *i != super::UPPER || !self.upper)
        {
            let pfd = self.dir_fd(parent, idx)?;
            match probe(&pfd, name)? {
                Probe::WhitedOut => return Ok(false),
                Probe::Missing => continue,
                Probe::Entry(_) => return Ok(true),
            }
        }
        Ok(false)
    }

    /// Looks `name` up in `parent` and takes a kernel reference on the result.
    pub fn lookup(&self, parent: Ino, name: &OsStr) -> Result<Entry> {
        check_name(name)?;
        if whiteout::is_reserved_name(name) {
            return Err(Errno::NOENT);
        }
        let p = self.inode(parent)?;
        if !p.is_dir() {
            return Err(Errno::NOTDIR);
        }
        let found = self.resolve(&p, name)?.ok_or(Errno::NOENT)?;
        let inode = self.adopt(parent, name, found)?;
        let attr = self.getattr(inode.ino)?;
        Ok(Entry {
            attr,
            ttl: self.opts.ttl,
        })
    }

    /// Finds or creates the inode for a resolved entry, holding one new kernel
    /// reference on it.
    pub(crate) fn adopt(&self, parent: Ino, name: &OsStr, found: Found) -> Result<Arc<Inode>> {
        let key = (found.stat.st_dev, found.stat.st_ino);
        if let Some(inode) = self.inodes.reference_by_identity(key) {
            if inode.kind == found.kind {
                let mut st = inode.state.write();
                // The name just used certainly leads to the entry: remember it for
                // name-relative operations (it may be another hard link).
                st.parent = parent;
                st.name = name.to_os_string();
                st.detached = false;
                if !inode.is_dir() {
                    st.layers = found.layers;
                }
                return Ok(inode.clone());
            }
            // Same (dev, ino) but another type: the layer changed under us and the
            // old inode is stale; it keeps its number, the new object gets another.
            self.inodes.forget(inode.ino, 1);
        }
        let preferred = self.derived_ino(found.top_layer(), found.stat.st_ino);
        let cached = found.layers.iter().filter(|l| l.fd.is_some()).count() as u64;
        let layers = if self.inodes.dir_fds.load(Ordering::Relaxed) + cached > self.dir_fd_budget {
            found
                .layers
                .into_iter()
                .map(|l| LayerRef {
                    layer: l.layer,
                    fd: None,
                })
                .collect()
        } else {
            self.inodes.dir_fds.fetch_add(cached, Ordering::Relaxed);
            found.layers
        };
        let state = InodeState {
            parent,
            name: name.to_os_string(),
            layers,
            keys: vec![key],
            detached: false,
            pinned: None,
        };
        Ok(self.inodes.insert(preferred, found.kind, state))
    }

    /// The real object's stat for an inode, from its top-most layer.
    pub(crate) fn stat_inode(&self, inode: &Inode) -> Result<Stat> {
        let st = if inode.is_dir() {
            let top = inode.state.read().top_layer().ok_or(Errno::STALE)?;
            sys::fs::fstat(self.dir_fd(inode, top)?.as_fd())?
        } else {
            let pinned = inode.state.read().pinned_if_detached();
            match pinned {
                Some(fd) => sys::fs::fstat(fd.as_fd())?,
                None => {
                    let (pfd, name, _) = self.entry_loc(inode)?;
                    sys::fs::stat_at(pfd.as_fd(), &name)?
                }
            }
        };
        if st.st_mode & libc::S_IFMT != inode.kind {
            return Err(Errno::STALE);
        }
        Ok(st)
    }

    /// The attributes shown for `inode` given its real stat. A directory merged from
    /// several layers reports one link, as kernel overlayfs does: counting its
    /// subdirectories across layers is not worth it and `find` accepts 1.
    pub(crate) fn attr_of(&self, inode: &Inode, st: &Stat) -> Attr {
        let mut attr = attr_from_stat(inode.ino, st);
        if inode.is_dir() && inode.state.read().layers.len() > 1 {
            attr.nlink = 1;
        }
        attr
    }

    pub fn forget(&self, ino: Ino, n: u64) {
        self.inodes.forget(ino, n);
    }
}
