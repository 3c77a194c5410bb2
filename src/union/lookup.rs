//! Name resolution across layers (the kernel's namei.c): upper first, then the lowers
//! top-down; a whiteout stops the search, a non-directory hides everything below it,
//! an opaque directory hides the directories below it. A directory's redirect sends
//! the search in the layers below it to another path (redirect.rs); an upper file
//! marked metacopy takes its data from the first regular file below it (metacopy.rs);
//! an upper entry's recorded origin gives its inode number (origin.rs).

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use super::inode::{Inode, InodeState, LayerRef, ROOT_INO};
use super::redirect;
use super::whiteout;
use super::{Attr, Entry, Errno, Ino, Result, Union, WithContext, attr_from_stat};
use crate::layer::LayerIdx;
use crate::sys::{self, fs::Stat, xattr::Target};

/// What a name resolves to in the merged view.
#[derive(Clone)]
pub(crate) struct Found {
    pub kind: u32,
    /// The top-most layer's stat: the one the merged entry shows.
    pub stat: Stat,
    /// Directories: every merged layer, each with an open handle. Non-directories: one.
    pub layers: Vec<LayerRef>,
    /// Directories whose lower layers were reached through a redirect: its
    /// absolute lower path.
    pub redirect: Option<OsString>,
    /// Directories: a redirect found below the top layer (or a chain of them) put
    /// some layers' copies at paths `redirect` does not give, so their handles
    /// cannot be reopened later and are kept for the inode's life.
    pub chained: bool,
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

/// Looks for `name` in one layer's copy of a directory; `layers_below` as for
/// [`whiteout::probe`].
fn probe(dir: &OwnedFd, name: &OsStr, layers_below: bool) -> Result<Probe> {
    Ok(match whiteout::probe(dir.as_fd(), name, layers_below)? {
        whiteout::Probe::Entry(st) => Probe::Entry(st),
        whiteout::Probe::CharWhiteout | whiteout::Probe::AufsWhiteout => Probe::WhitedOut,
        whiteout::Probe::Missing => Probe::Missing,
    })
}

impl Union {
    /// Visits `inode` and then its ancestors, nearest first, until `visit` returns a
    /// value. Iterative, as a lower tree may be thousands of levels deep; bounded by
    /// the size of the inode table, since parent links come from names the kernel
    /// looked up and a cycle among them (a layer changed under us) must end in ELOOP
    /// rather than a spin. `visit` must return a value at the root.
    pub(crate) fn walk_up<T>(
        &self,
        inode: &Inode,
        mut visit: impl FnMut(&Inode) -> Result<Option<T>>,
    ) -> Result<T> {
        if let Some(t) = visit(inode)? {
            return Ok(t);
        }
        let mut parent = inode.state.read().parent();
        for _ in 0..=self.inodes.len() {
            let cur = self.inode(parent)?;
            if let Some(t) = visit(&cur)? {
                return Ok(t);
            }
            if cur.ino == ROOT_INO {
                return Err(Errno::IO.into());
            }
            parent = cur.state.read().parent();
        }
        Err(Errno::LOOP.into())
    }

    /// An O_PATH handle on `inode`'s directory in layer `idx`: the cached one, or one
    /// re-opened from the nearest ancestor whose handle is known (each opened on the
    /// way is cached while the fd budget allows).
    pub(crate) fn dir_fd(&self, inode: &Inode, idx: LayerIdx) -> Result<Arc<OwnedFd>> {
        // Inodes between the known handle and `inode` (included), nearest to it first.
        let mut below: Vec<(Ino, OsString)> = Vec::new();
        let (mut fd, opened_for) = self.walk_up(inode, |i| {
            let st = i.state.read();
            let r = st
                .layers()
                .iter()
                .find(|l| l.layer == idx)
                .ok_or(Errno::NOENT)?;
            if let Some(fd) = &r.fd {
                return Ok(Some((fd.clone(), None)));
            }
            if i.ino == ROOT_INO {
                return Ok(Some((self.layer(idx)?.root.clone(), None)));
            }
            // Below the top copy, a redirected directory sits at its redirect path.
            if let Some(path) = st.redirect().filter(|_| st.top_layer() != Some(idx)) {
                return match redirect::walk(self.layer(idx)?.root_fd(), path)? {
                    redirect::Walk::Dir { fd, .. } => Ok(Some((Arc::new(fd), Some(i.ino)))),
                    _ => Err(Errno::STALE.into()),
                };
            }
            below.push((i.ino, st.name().to_os_string()));
            Ok(None)
        })?;
        if let Some(ino) = opened_for {
            self.cache_dir_fd(ino, idx, &fd);
        }
        for (ino, name) in below.into_iter().rev() {
            fd = Arc::new(sys::fs::open_dir(fd.as_fd(), &name)?);
            self.cache_dir_fd(ino, idx, &fd);
        }
        Ok(fd)
    }

    /// Keeps `fd` as inode `ino`'s handle in layer `idx`; the fd budget evicts the
    /// oldest cached handle beyond it.
    fn cache_dir_fd(&self, ino: Ino, idx: LayerIdx, fd: &Arc<OwnedFd>) {
        let Some(target) = self.inodes.get(ino) else {
            return;
        };
        let cached = target.state.write().cache_fd(idx, fd);
        if cached {
            self.inodes.note_cached_fd(&target, idx);
        }
    }

    /// Where a non-directory lives: its parent's directory in the entry's layer, and
    /// its name there.
    pub(crate) fn entry_loc(&self, inode: &Inode) -> Result<(Arc<OwnedFd>, OsString, LayerIdx)> {
        let (parent, name, layer) = {
            let st = inode.state.read();
            if st.is_detached() {
                return Err(Errno::NOENT.into());
            }
            (
                st.parent(),
                Box::<OsStr>::from(st.name()),
                st.top_layer().ok_or(Errno::NOENT)?,
            )
        };
        let p = self.inode(parent)?;
        let pfd = self.dir_fd(&p, layer)?;
        Ok((pfd, name.into(), layer))
    }

    /// Runs `f` on the object `inode` stands for, named for metadata calls (owner,
    /// mode, times, xattrs): a directory's top copy; a removed entry's pinned handle
    /// (the kernel may still reach it by another hard link or an open fd); else its
    /// name in its layer.
    pub(crate) fn object_target<T>(
        &self,
        inode: &Inode,
        f: impl FnOnce(Target<'_>) -> Result<T>,
    ) -> Result<T> {
        if inode.is_dir() {
            let top = inode.state.read().top_layer().ok_or(Errno::STALE)?;
            let fd = self.dir_fd(inode, top)?;
            return f(Target::Fd(fd.as_fd()));
        }
        let pinned = inode.state.read().pinned_if_detached();
        if let Some(fd) = pinned {
            return f(Target::Fd(fd.as_fd()));
        }
        let (pfd, name, _) = self.entry_loc(inode)?;
        f(Target::Entry(pfd.as_fd(), &name))
    }

    /// Resolves `name` in the merged directory `parent`; `None` when it does not exist.
    pub(crate) fn resolve(&self, parent: &Inode, name: &OsStr) -> Result<Option<Found>> {
        let refs = parent.state.read().layer_indexes();
        let bottom = self.bottom_layer();
        let mut found: Option<Found> = None;
        for (pos, &idx) in refs.iter().enumerate() {
            let pfd = self.dir_fd(parent, idx)?;
            // A whiteout in the last layer of the merge stops nothing.
            let layers_below = pos + 1 < refs.len();
            let st = match probe(&pfd, name, layers_below).in_layer_of(self, idx)? {
                Probe::WhitedOut => break,
                Probe::Missing => continue,
                Probe::Entry(st) => st,
            };
            let kind = st.st_mode & libc::S_IFMT;
            if kind != libc::S_IFDIR {
                if found.is_none() {
                    let mut layers = vec![LayerRef {
                        layer: idx,
                        fd: None,
                    }];
                    let upper = self.upper && idx == super::UPPER;
                    if upper && self.is_metacopy(Target::Entry(pfd.as_fd(), name), &st) {
                        match self.metacopy_data(parent, &refs[pos + 1..], name)? {
                            Some(layer) => layers.push(LayerRef { layer, fd: None }),
                            None => log::warn!("{name:?}: metadata-only copy without data below"),
                        }
                    }
                    found = Some(Found {
                        kind,
                        stat: st,
                        layers,
                        redirect: None,
                        chained: false,
                    });
                }
                break;
            }
            let fd = Arc::new(sys::fs::open_dir(pfd.as_fd(), name).in_layer_of(self, idx)?);
            let marks = redirect::dir_marks(fd.as_fd(), idx < bottom)
                .doing("reading a directory's redirect and opaque markers")
                .in_layer_of(self, idx)?;
            let r = LayerRef {
                layer: idx,
                fd: Some(fd),
            };
            let redirect = marks.redirect.filter(|_| !marks.opaque);
            match found.take() {
                Some(mut f) => {
                    f.layers.push(r);
                    if let Some(value) = redirect {
                        // A lower copy moved by redirect in its own layer: the layers
                        // below it hold the content at its redirect.
                        let path = self
                            .absolute_redirect(parent, value)
                            .in_layer_of(self, idx)?;
                        self.follow_redirect(&mut f, idx, &path)?;
                        f.chained = true;
                        return Ok(Some(f));
                    }
                    found = Some(f);
                }
                None => {
                    let mut f = Found {
                        kind,
                        stat: st,
                        layers: vec![r],
                        redirect: None,
                        chained: false,
                    };
                    if let Some(value) = redirect {
                        let path = self
                            .absolute_redirect(parent, value)
                            .in_layer_of(self, idx)?;
                        f.chained = self.follow_redirect(&mut f, idx, &path)?;
                        f.redirect = Some(path);
                        return Ok(Some(f));
                    }
                    found = Some(f);
                }
            }
            if marks.opaque {
                break;
            }
        }
        Ok(found)
    }

    /// The layer holding the data of a metadata-only copy: the first regular file of
    /// that name below it.
    fn metacopy_data(
        &self,
        parent: &Inode,
        below: &[LayerIdx],
        name: &OsStr,
    ) -> Result<Option<LayerIdx>> {
        for &idx in below {
            let dir = self.dir_fd(parent, idx)?;
            match probe(&dir, name, true)? {
                Probe::Missing => continue,
                Probe::Entry(st) if st.st_mode & libc::S_IFMT == libc::S_IFREG => {
                    return Ok(Some(idx));
                }
                _ => return Ok(None),
            }
        }
        Ok(None)
    }

    /// Merges into `found` the directories at `path` in the layers below `top`. A
    /// directory found there that carries a redirect of its own sends the search in
    /// the layers below it to that path, as kernel overlayfs chains them; returns
    /// whether one did (those layers' copies are then not at `path`). Bounded by the
    /// number of layers.
    fn follow_redirect(&self, found: &mut Found, top: LayerIdx, path: &OsStr) -> Result<bool> {
        let bottom = self.bottom_layer();
        let mut path = path.to_os_string();
        let mut chained = false;
        for idx in top + 1..=bottom {
            let (fd, opaque) = match redirect::walk(self.layer(idx)?.root_fd(), &path)
                .doing("following a redirect")
                .on(&path)
                .in_layer_of(self, idx)?
            {
                redirect::Walk::Dir { fd, opaque } => (fd, opaque),
                redirect::Walk::Missing => continue,
                redirect::Walk::Stop => break,
            };
            let next = match opaque || idx == bottom {
                true => None,
                false => redirect::dir_marks(fd.as_fd(), false)?.redirect,
            };
            found.layers.push(LayerRef {
                layer: idx,
                fd: Some(Arc::new(fd)),
            });
            if opaque {
                break;
            }
            if let Some(value) = next {
                path = redirect::chained(&path, value);
                chained = true;
            }
        }
        Ok(chained)
    }

    /// Whether `name` exists in the layers of `parent` below the upper one, i.e.
    /// whether removing or moving the upper entry must leave a whiteout.
    pub(crate) fn lower_has(&self, parent: &Inode, name: &OsStr) -> Result<bool> {
        let refs = parent.state.read().layer_indexes();
        for idx in refs
            .into_iter()
            .filter(|i| *i != super::UPPER || !self.upper)
        {
            let pfd = self.dir_fd(parent, idx)?;
            match probe(&pfd, name, true)? {
                Probe::WhitedOut => return Ok(false),
                Probe::Missing => continue,
                Probe::Entry(_) => return Ok(true),
            }
        }
        Ok(false)
    }

    /// [`Union::lookup`] in a merged directory (the name already checked).
    pub(crate) fn merged_lookup(&self, parent: Ino, name: &OsStr) -> Result<Entry> {
        if whiteout::is_reserved_name(name) {
            return Err(Errno::NOENT.into());
        }
        let p = self.inode(parent)?;
        if !p.is_dir() {
            return Err(Errno::NOTDIR.into());
        }
        let found = self.resolve_linking(&p, name)?.ok_or(Errno::NOENT)?;
        let (top, st) = (found.top_layer(), found.stat);
        let inode = self.adopt(parent, name, found)?;
        let attr = self.attr_from_stat_of(&inode, top, &st)?;
        Ok(Entry {
            attr,
            ttl: self.opts.ttl,
        })
    }

    /// [`lookup`](Self::lookup) of an entry of a listing (readdirplus), using where
    /// the listing found it. A non-directory listed from lower layer `i` had nothing
    /// of its name above it in the layers then; of those only the upper one can have
    /// changed since (lower layers are read-only), so it alone is probed again, and
    /// the entry is taken from layer `i` with one stat: no probes of the layers in
    /// between. Anything else, or anything that no longer matches, is looked up
    /// from scratch.
    pub fn lookup_listed(&self, parent: Ino, entry: &super::readdir::DirEntry) -> Result<Entry> {
        let Some(idx) = entry.listed_in else {
            return self.lookup(parent, &entry.name);
        };
        let name = entry.name.as_os_str();
        let p = self.inode(parent)?;
        let (in_layers, has_upper) = {
            let st = p.state.read();
            (st.in_layer(idx), st.in_layer(super::UPPER))
        };
        if !p.is_dir() || !in_layers || self.is_grafted(parent) {
            return self.lookup(parent, name);
        }
        if has_upper && self.upper {
            let ufd = self.dir_fd(&p, super::UPPER)?;
            if !matches!(probe(&ufd, name, true)?, Probe::Missing) {
                return self.lookup(parent, name);
            }
        }
        let st = match sys::fs::stat_at(self.dir_fd(&p, idx)?.as_fd(), name) {
            Ok(st) if st.st_mode & libc::S_IFMT == entry.kind && entry.kind != libc::S_IFDIR => st,
            _ => return self.lookup(parent, name),
        };
        let found = Found {
            kind: entry.kind,
            stat: st,
            layers: vec![LayerRef {
                layer: idx,
                fd: None,
            }],
            redirect: None,
            chained: false,
        };
        // A name of a copied-up hard-link group is linked to the copy first.
        if self.is_indexed(&found) {
            return self.lookup(parent, name);
        }
        let inode = self.adopt(parent, name, found)?;
        let attr = self.attr_from_stat_of(&inode, idx, &st)?;
        Ok(Entry {
            attr,
            ttl: self.opts.ttl,
        })
    }

    /// Finds or creates the inode for a resolved entry, holding one new kernel
    /// reference on it.
    pub(crate) fn adopt(&self, parent: Ino, name: &OsStr, found: Found) -> Result<Arc<Inode>> {
        self.adopt_entry(parent, name, found, false)
    }

    /// As [`adopt`](Self::adopt), for an upper entry this mount has just made: it
    /// carries no origin marker, so none is read.
    pub(crate) fn adopt_made(&self, parent: Ino, name: &OsStr, found: Found) -> Result<Arc<Inode>> {
        self.adopt_entry(parent, name, found, true)
    }

    fn adopt_entry(
        &self,
        parent: Ino,
        name: &OsStr,
        found: Found,
        made_here: bool,
    ) -> Result<Arc<Inode>> {
        let key = (found.stat.st_dev, found.stat.st_ino);
        if let Some(inode) = self.inodes.reference_by_identity(key) {
            let split =
                !inode.is_dir() && found.top_layer() != super::UPPER && self.is_in_upper(&inode);
            if split && self.is_indexed(&found) && self.check_writable().is_ok() {
                // Copied up through another name while this one was being resolved:
                // it is linked to the copy and taken from there.
                self.inodes.forget(inode.ino, 1);
                let p = self.inode(parent)?;
                let again = self.resolve_linking(&p, name)?.ok_or(Errno::NOENT)?;
                if again.top_layer() != super::UPPER {
                    return Err(Errno::STALE.into());
                }
                return self.adopt_entry(parent, name, again, made_here);
            }
            if split {
                // The lower file was copied up through another name and this name
                // cannot be linked to the copy (no index, or a read-only mount): from
                // now on it is another file, with an inode of its own, so that one
                // node id never stands for two files.
                self.inodes.remove_identity(&inode, key);
            } else if inode.kind == found.kind {
                // The name just used certainly leads to the entry: name-relative
                // operations use it from now on (it may be another hard link).
                inode.reached_by(parent, name);
                let mut st = inode.state.write();
                if !inode.is_dir() {
                    st.refound_file(found.layers);
                } else if let Some(path) = found.redirect {
                    st.refound_redirect(path);
                }
                return Ok(inode.clone());
            }
            // Split off, or the same (dev, ino) with another type (the layer changed
            // under us and the old inode is stale): the old inode keeps its number and
            // gives back the reference just taken; the object gets a new inode.
            self.inodes.forget(inode.ino, 1);
        }
        let (preferred, nlink_adjust) = if made_here {
            (self.derived_ino(found.top_layer(), found.stat.st_ino), 0)
        } else {
            self.preferred_ino(parent, name, &found)?
        };
        let cached: Vec<LayerIdx> = found
            .layers
            .iter()
            .filter(|l| l.fd.is_some())
            .map(|l| l.layer)
            .collect();
        let state = InodeState::new(
            parent,
            name.to_os_string(),
            found.kind,
            found.layers,
            vec![key],
            found.redirect,
        )
        .ok_or(Errno::IO)?
        .with_nlink_adjust(nlink_adjust);
        let inode = self.inodes.insert(preferred, found.kind, state);
        if !found.chained {
            for idx in cached {
                self.inodes.note_cached_fd(&inode, idx);
            }
        }
        Ok(inode)
    }

    /// The number a newly adopted entry asks for: an upper entry's recorded origin,
    /// else the one derived from its real inode.
    /// Also how its shown st_nlink differs from its own, from the same marker.
    fn preferred_ino(&self, parent: Ino, name: &OsStr, found: &Found) -> Result<(Ino, i64)> {
        let derived = self.derived_ino(found.top_layer(), found.stat.st_ino);
        if !self.upper || found.top_layer() != super::UPPER {
            return Ok((derived, 0));
        }
        let origin = match found.layers.first().and_then(|l| l.fd.as_ref()) {
            Some(fd) => self.origin(Target::Fd(fd.as_fd())),
            None => {
                let p = self.inode(parent)?;
                let pfd = self.dir_fd(&p, super::UPPER)?;
                self.origin(Target::Entry(pfd.as_fd(), name))
            }
        };
        Ok(match origin {
            Some(o) if found.kind != libc::S_IFDIR => (o.ino, o.nlink_adjust),
            Some(o) => (o.ino, 0),
            None => (derived, 0),
        })
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
            return Err(Errno::STALE.into());
        }
        Ok(st)
    }

    /// The attributes shown for `inode` given its real stat. A directory merged from
    /// several layers reports one link, as kernel overlayfs does: counting its
    /// subdirectories across layers is not worth it and `find` accepts 1.
    pub(crate) fn attr_of(&self, inode: &Inode, st: &Stat) -> Attr {
        let mut attr = attr_from_stat(inode.ino, st);
        let state = inode.state.read();
        if state.merges_layers() {
            attr.nlink = 1;
        }
        if !inode.is_dir() && attr.nlink > 0 && state.top_layer() == Some(super::UPPER) {
            let shown = i64::from(attr.nlink).saturating_add(state.nlink_adjust());
            attr.nlink = u32::try_from(shown.max(0)).unwrap_or(u32::MAX);
        } else if !inode.is_dir() && attr.nlink > 1 {
            attr.nlink = u32::try_from(self.shown_lower_nlink(st)).unwrap_or(attr.nlink);
        }
        // A removed lower entry lives on below its whiteout; to its open handles it
        // is gone (an upper one's own count already says so).
        if state.is_detached() && state.top_layer() != Some(super::UPPER) {
            attr.nlink = 0;
        }
        attr
    }

    pub fn forget(&self, ino: Ino, n: u64) {
        self.inodes.forget(ino, n);
    }
}
