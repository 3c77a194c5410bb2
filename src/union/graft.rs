//! Grafts: named volumes and host directories attached at paths of the merged view.
//!
//! Each graft source is opened as one extra layer after the union's own layers (index
//! `Grafts::base` and up). An inode under a graft has exactly one `LayerRef`, into its
//! graft's layer; every operation on it is a plain fd-relative syscall in that
//! directory — no copy-up, no whiteouts, nothing written to the upper layer.
//!
//! Invariants:
//! - The directories leading to a graft point exist in the merged view: a private
//!   scaffold directory holding just the target paths is the bottom-most lower layer,
//!   and a missing ancestor hidden by a whiteout is made in the upper layer at mount.
//!   Those ancestors are looked up once at mount and their references are never
//!   dropped, so their inode numbers (the keys of `points` and `anchors`) stay valid.
//! - A graft point and its ancestors can be neither removed nor moved (EBUSY); nothing
//!   is renamed or linked across a graft boundary (EXDEV).
//! - Identity keys of graft entries carry the graft layer in the top bits of the
//!   device number, so a graft of a directory that is also in a layer never shares an
//!   inode with the layer's copy.
//! - Entries and attributes under a graft are cached by the kernel for `GRAFT_TTL`
//!   (zero): other mounts and the host change volumes behind this daemon's back.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::sync::Arc;
use std::time::Duration;

use rustix::fs::OFlags;

use super::copy_up::copy_data;
use super::dir_ops::{new_owner, pin_entry, set_name, set_owner_and_mode};
use super::inode::{Inode, InodeState, LayerRef};
use super::lookup::{Found, check_name};
use super::readdir::DirEntry;
use super::{
    Attr, Caller, Entry, Errno, Ino, OpenFile, ROOT_INO, RenameMode, Result, StatFs, Union,
};
use crate::config::{GraftSource, MountConfig};
use crate::layer::{Layer, LayerIdx};
use crate::sys::{self, fs::RenameKind, fs::Stat, fs::TimeSpec, xattr::Target};
use crate::volume::claims::{self, Claim, MountUse};
use crate::volume::quota::Quota;
use crate::volume::{Store, Volume};

/// How long the kernel may cache entries and attributes under a graft.
pub const GRAFT_TTL: Duration = Duration::ZERO;

pub(crate) struct Graft {
    pub layer: LayerIdx,
    pub read_only: bool,
    pub quota: Option<Quota>,
}

/// The grafts of a mount. Empty (and `base` = number of layers) without any.
#[derive(Default)]
pub(crate) struct Grafts {
    pub base: LayerIdx,
    pub list: Vec<Graft>,
    /// Union directory -> names in it that are graft points (and which graft).
    points: HashMap<Ino, Vec<(OsString, usize)>>,
    /// (directory, name) of every ancestor of a graft point.
    anchors: HashMap<Ino, Vec<OsString>>,
    _scaffold: Option<tempfile::TempDir>,
    _claims: Vec<Claim>,
}

impl Grafts {
    pub fn new(base: LayerIdx) -> Grafts {
        Grafts {
            base,
            ..Grafts::default()
        }
    }

    fn point(&self, parent: Ino, name: &OsStr) -> Option<usize> {
        self.points
            .get(&parent)?
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, g)| *g)
    }

    /// Whether `name` in `parent` is a graft point or leads to one.
    fn pinned(&self, parent: Ino, name: &OsStr) -> bool {
        self.point(parent, name).is_some()
            || self
                .anchors
                .get(&parent)
                .is_some_and(|v| v.iter().any(|n| n == name))
    }
}

/// What `prepare` opened before the union exists: the extra layers and the locks
/// that must be held while the mount runs (claims) or until it is set up (volume locks).
pub(crate) struct Prepared {
    pub scaffold: Option<Layer>,
    pub layers: Vec<Layer>,
    scaffold_dir: Option<tempfile::TempDir>,
    claims: Vec<Claim>,
    /// Per graft: the volume (named volumes only) and its held lock.
    volumes: Vec<Option<(Volume, std::fs::File)>>,
}

fn graft_name(source: &GraftSource) -> String {
    match source {
        GraftSource::Volume(n) => format!("volume {n}"),
        GraftSource::Bind(p) => format!("bind {}", p.display()),
    }
}

/// Opens the sources of the grafts of `config`: creates missing named volumes, takes
/// their claims (failing when an exclusive one is held elsewhere), and builds the
/// scaffold layer. Nothing is mounted yet, so a failure here leaves no trace.
pub(crate) fn prepare(config: &MountConfig) -> std::result::Result<Prepared, String> {
    let mut prepared = Prepared {
        scaffold: None,
        layers: Vec::new(),
        scaffold_dir: None,
        claims: Vec::new(),
        volumes: Vec::new(),
    };
    if config.grafts.is_empty() {
        return Ok(prepared);
    }
    for (i, a) in config.grafts.iter().enumerate() {
        // Checked before any volume lock is taken: locking one volume twice would wait
        // on ourselves.
        if config.grafts[..i].iter().any(|b| b.source == a.source) {
            return Err(format!(
                "{}: grafted twice in one mount",
                graft_name(&a.source)
            ));
        }
        for b in &config.grafts {
            if a.target != b.target && b.target.starts_with(&a.target) {
                return Err(format!(
                    "{}: {} lies inside the graft at {}; nested grafts are not supported",
                    graft_name(&b.source),
                    b.target.display(),
                    a.target.display()
                ));
            }
        }
    }
    let writable_mount = !config.read_only();
    // Volume locks are taken in name order, so that two mounts of the same volumes
    // listed in different orders cannot wait on each other.
    let mut locked = HashMap::new();
    let mut names: Vec<&String> = config
        .grafts
        .iter()
        .filter_map(|g| match &g.source {
            GraftSource::Volume(n) => Some(n),
            GraftSource::Bind(_) => None,
        })
        .collect();
    names.sort();
    if !names.is_empty() {
        let store = Store::open(config.state_dir.as_deref()).map_err(|e| e.to_string())?;
        for name in names {
            let held = store.lock_volume(name).map_err(|e| e.to_string())?;
            locked.insert(name.clone(), held);
        }
    }
    for spec in &config.grafts {
        let what = graft_name(&spec.source);
        let (path, volume) = match &spec.source {
            GraftSource::Bind(p) => (p.clone(), None),
            GraftSource::Volume(name) => {
                let (vol, lock) = locked.remove(name).ok_or("volume lock lost")?;
                let who = MountUse {
                    pid: std::process::id(),
                    mountpoint: config.mountpoint.clone(),
                    target: spec.target.clone(),
                    read_only: spec.read_only || !writable_mount,
                };
                let claim = claims::claim(name, &vol.dir, &who, vol.meta.exclusive)
                    .map_err(|e| e.to_string())?;
                prepared.claims.push(claim);
                (vol.data_dir(), Some((vol, lock)))
            }
        };
        let layer = Layer::open(&path, writable_mount && !spec.read_only)
            .map_err(|e| format!("{what}: {}: {e}", path.display()))?;
        prepared.layers.push(layer);
        prepared.volumes.push(volume);
    }
    let dir = tempfile::Builder::new()
        .prefix("stratafs-grafts-")
        .tempdir()
        .map_err(|e| format!("graft scaffold: {e}"))?;
    for spec in &config.grafts {
        let rel = spec.target.strip_prefix("/").unwrap_or(&spec.target);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir.path().join(rel))
            .map_err(|e| format!("graft scaffold for {}: {e}", spec.target.display()))?;
    }
    prepared.scaffold =
        Some(Layer::open(dir.path(), false).map_err(|e| format!("graft scaffold: {e}"))?);
    prepared.scaffold_dir = Some(dir);
    Ok(prepared)
}

fn tagged_key(layer: LayerIdx, st: &Stat) -> (u64, u64) {
    (st.st_dev ^ ((layer as u64 + 1) << 56), st.st_ino)
}

impl Union {
    /// Attaches the prepared grafts: makes sure each target's ancestors exist, fills
    /// empty named volumes from the content they cover, pins the ancestors, and opens
    /// the quotas. Called once from `Union::new`, before anything is served.
    pub(crate) fn install_grafts(
        &mut self,
        config: &MountConfig,
        prepared: Prepared,
    ) -> std::result::Result<(), String> {
        let Prepared {
            scaffold_dir,
            claims,
            volumes,
            ..
        } = prepared;
        let mut list = Vec::new();
        let mut points: HashMap<Ino, Vec<(OsString, usize)>> = HashMap::new();
        let mut anchors: HashMap<Ino, Vec<OsString>> = HashMap::new();
        for (gi, (spec, volume)) in config.grafts.iter().zip(volumes).enumerate() {
            let what = graft_name(&spec.source);
            let target = spec.target.display();
            let layer = self.grafts.base + gi;
            let mut parent = ROOT_INO;
            let comps: Vec<&OsStr> = spec.target.iter().skip(1).collect();
            let Some((last, ancestors)) = comps.split_last() else {
                return Err(format!("{what}: cannot graft onto /"));
            };
            for comp in ancestors {
                let e = match self.lookup(parent, comp) {
                    Ok(e) => e,
                    // Hidden by a whiteout or an opaque directory above the scaffold.
                    Err(Errno::NOENT) if self.upper => self
                        .mkdir(daemon_caller(), parent, comp, 0o755)
                        .map_err(|e| format!("{what}: creating {target}: {e}"))?,
                    Err(e) => return Err(format!("{what}: {target}: {e}")),
                };
                if e.attr.kind() != libc::S_IFDIR {
                    self.forget(e.attr.ino, 1);
                    return Err(format!(
                        "{what}: {target}: a path component is not a directory"
                    ));
                }
                anchors.entry(parent).or_default().push(comp.to_os_string());
                // The reference is kept for the life of the mount (see module notes).
                parent = e.attr.ino;
            }
            let covered = match self.lookup(parent, last) {
                Ok(e) if e.attr.kind() == libc::S_IFDIR => Some(e.attr.ino),
                Ok(e) => {
                    self.forget(e.attr.ino, 1);
                    return Err(format!("{what}: {target} is not a directory in the layers"));
                }
                Err(Errno::NOENT) => None,
                Err(e) => return Err(format!("{what}: {target}: {e}")),
            };
            let root = self.layer(layer).map_err(|e| e.to_string())?.root.clone();
            if let (Some(src), Some((vol, _lock))) = (covered, &volume) {
                if !spec.nocopy && is_empty(root.as_fd()).map_err(|e| e.to_string())? {
                    self.populate_root(src, root.as_fd())
                        .map_err(|e| format!("{what}: filling it from {target}: {e}"))?;
                    log::info!("volume {} filled from {target}", vol.name);
                }
            }
            if let Some(ino) = covered {
                self.forget(ino, 1);
            }
            points
                .entry(parent)
                .or_default()
                .push((last.to_os_string(), gi));
            let quota = match &volume {
                Some((vol, _)) => match vol.meta.size_limit {
                    Some(limit) => Some(Quota::open(&vol.dir, root.clone(), limit)?),
                    None => None,
                },
                None => None,
            };
            list.push(Graft {
                layer,
                read_only: spec.read_only || self.opts.read_only,
                quota,
            });
        }
        self.grafts.list = list;
        self.grafts.points = points;
        self.grafts.anchors = anchors;
        self.grafts._scaffold = scaffold_dir;
        self.grafts._claims = claims;
        Ok(())
    }

    /// The graft `inode` lies in, if any.
    fn graft_index(&self, inode: &Inode) -> Option<usize> {
        if self.grafts.list.is_empty() {
            return None;
        }
        let top = inode.state.read().top_layer()?;
        top.checked_sub(self.grafts.base)
            .filter(|i| *i < self.grafts.list.len())
    }

    fn graft_dir(&self, ino: Ino) -> Option<(Arc<Inode>, usize)> {
        if self.grafts.list.is_empty() {
            return None;
        }
        let inode = self.inode(ino).ok()?;
        let gi = self.graft_index(&inode)?;
        Some((inode, gi))
    }

    fn graft_check_writable(&self, gi: usize) -> Result<()> {
        if self.grafts.list[gi].read_only {
            Err(Errno::ROFS)
        } else {
            Ok(())
        }
    }

    /// Cache lifetime of `ino`'s attributes.
    pub fn attr_ttl(&self, ino: Ino) -> Duration {
        match self.graft_dir(ino) {
            Some(_) => GRAFT_TTL,
            None => self.opts.ttl,
        }
    }

    /// Whether `ino` lies under a graft (its data may change behind the kernel's back).
    pub fn is_grafted(&self, ino: Ino) -> bool {
        self.graft_dir(ino).is_some()
    }

    /// Whether every write to `ino` must reach the daemon (it is size-limited), so
    /// that it cannot be opened with passthrough.
    pub fn io_needs_daemon(&self, ino: Ino) -> bool {
        self.graft_dir(ino)
            .is_some_and(|(_, gi)| self.grafts.list[gi].quota.is_some())
    }

    /// copy_up hook: a graft entry is written in place; `Some` for graft inodes.
    pub(crate) fn graft_copy_up(&self, inode: &Inode) -> Option<Result<()>> {
        let gi = self.graft_index(inode)?;
        Some(self.graft_check_writable(gi))
    }

    /// is_in_upper hook: a writable graft entry is the copy all writers share.
    pub(crate) fn graft_in_place(&self, inode: &Inode) -> Option<bool> {
        let gi = self.graft_index(inode)?;
        Some(!self.grafts.list[gi].read_only)
    }

    /// lookup hook: names in a graft directory, and graft points themselves.
    pub(crate) fn graft_lookup(&self, parent: Ino, name: &OsStr) -> Option<Result<Entry>> {
        if let Some((p, _)) = self.graft_dir(parent) {
            return Some(self.graft_child(&p, name));
        }
        let gi = self.grafts.point(parent, name)?;
        Some(self.graft_root_entry(gi, parent, name))
    }

    fn graft_root_entry(&self, gi: usize, parent: Ino, name: &OsStr) -> Result<Entry> {
        let layer_idx = self.grafts.list[gi].layer;
        let layer = self.layer(layer_idx)?;
        let st = sys::fs::fstat(layer.root_fd())?;
        let key = tagged_key(layer_idx, &st);
        let inode = match self.inodes.reference_by_identity(key) {
            Some(inode) => inode,
            None => {
                // The root keeps its fd whatever the budget: it cannot be re-opened
                // from its parent, which is not in the graft's layer.
                self.inodes
                    .dir_fds
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let state = InodeState {
                    parent,
                    name: name.to_os_string(),
                    layers: vec![LayerRef {
                        layer: layer_idx,
                        fd: Some(layer.root.clone()),
                    }],
                    keys: vec![key],
                    detached: false,
                    pinned: None,
                };
                self.inodes
                    .insert(self.derived_ino(layer_idx, st.st_ino), libc::S_IFDIR, state)
            }
        };
        Ok(Entry {
            attr: self.getattr(inode.ino)?,
            ttl: GRAFT_TTL,
        })
    }

    /// Looks `name` up in the graft directory `p`, taking a kernel reference.
    fn graft_child(&self, p: &Inode, name: &OsStr) -> Result<Entry> {
        check_name(name)?;
        let layer = p.state.read().top_layer().ok_or(Errno::STALE)?;
        let pfd = self.dir_fd(p, layer)?;
        let mut stat = sys::fs::stat_at(pfd.as_fd(), name)?;
        let kind = stat.st_mode & libc::S_IFMT;
        let fd = if kind == libc::S_IFDIR {
            Some(Arc::new(sys::fs::open_dir(pfd.as_fd(), name)?))
        } else {
            None
        };
        stat.st_dev = tagged_key(layer, &stat).0;
        let found = Found {
            kind,
            stat,
            layers: vec![LayerRef { layer, fd }],
        };
        let inode = self.adopt(p.ino, name, found)?;
        Ok(Entry {
            attr: self.getattr(inode.ino)?,
            ttl: GRAFT_TTL,
        })
    }

    /// The graft directory `parent`, checked for making `name` in it.
    fn graft_new_name(&self, p: &Inode, gi: usize, name: &OsStr) -> Result<Arc<OwnedFd>> {
        check_name(name)?;
        self.graft_check_writable(gi)?;
        self.dir_fd(p, self.grafts.list[gi].layer)
    }

    pub(crate) fn graft_create(
        &self,
        caller: Caller,
        parent: Ino,
        name: &OsStr,
        mode: u32,
    ) -> Option<Result<(Entry, u64, Arc<OpenFile>)>> {
        let (p, gi) = self.graft_dir(parent)?;
        Some((|| {
            let pfd = self.graft_new_name(&p, gi, name)?;
            let (uid, gid, _) = new_owner(caller, &sys::fs::fstat(pfd.as_fd())?, false);
            let perm = mode & 0o7777;
            let file = sys::fs::open_at(
                pfd.as_fd(),
                name,
                OFlags::RDWR | OFlags::CREATE | OFlags::EXCL,
                perm,
            )?;
            sys::fs::fchown(file.as_fd(), Some(uid), Some(gid))?;
            if perm & (libc::S_ISUID | libc::S_ISGID) != 0 {
                sys::fs::chmod_fd(file.as_fd(), perm)?;
            }
            let entry = self.graft_child(&p, name)?;
            let (fh, handle) = self.register_file(entry.attr.ino, file, true, true);
            Ok((entry, fh, handle))
        })())
    }

    pub(crate) fn graft_mkdir(
        &self,
        caller: Caller,
        parent: Ino,
        name: &OsStr,
        mode: u32,
    ) -> Option<Result<Entry>> {
        let (p, gi) = self.graft_dir(parent)?;
        Some((|| {
            let pfd = self.graft_new_name(&p, gi, name)?;
            let (uid, gid, extra) = new_owner(caller, &sys::fs::fstat(pfd.as_fd())?, true);
            let perm = (mode & 0o7777) | extra;
            sys::fs::mkdir_at(pfd.as_fd(), name, perm)?;
            set_owner_and_mode(pfd.as_fd(), name, uid, gid, Some(perm))?;
            self.graft_child(&p, name)
        })())
    }

    pub(crate) fn graft_mknod(
        &self,
        caller: Caller,
        parent: Ino,
        name: &OsStr,
        mode: u32,
        rdev: u64,
    ) -> Option<Result<Entry>> {
        let (p, gi) = self.graft_dir(parent)?;
        Some((|| {
            let pfd = self.graft_new_name(&p, gi, name)?;
            let (uid, gid, _) = new_owner(caller, &sys::fs::fstat(pfd.as_fd())?, false);
            let kind = mode & libc::S_IFMT;
            let perm = mode & 0o7777;
            if kind == libc::S_IFREG || kind == 0 {
                drop(sys::fs::open_at(
                    pfd.as_fd(),
                    name,
                    OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
                    perm,
                )?);
            } else {
                sys::fs::mknod_at(pfd.as_fd(), name, kind | perm, rdev)?;
            }
            let setid = perm & (libc::S_ISUID | libc::S_ISGID) != 0;
            set_owner_and_mode(pfd.as_fd(), name, uid, gid, setid.then_some(perm))?;
            self.graft_child(&p, name)
        })())
    }

    pub(crate) fn graft_symlink(
        &self,
        caller: Caller,
        parent: Ino,
        name: &OsStr,
        target: &OsStr,
    ) -> Option<Result<Entry>> {
        let (p, gi) = self.graft_dir(parent)?;
        Some((|| {
            let pfd = self.graft_new_name(&p, gi, name)?;
            let (uid, gid, _) = new_owner(caller, &sys::fs::fstat(pfd.as_fd())?, false);
            let quota = self.grafts.list[gi].quota.as_ref();
            let len = target.len() as u64;
            if let Some(q) = quota {
                q.reserve(len)?;
            }
            let made = sys::fs::symlink_at(target, pfd.as_fd(), name)
                .and_then(|()| set_owner_and_mode(pfd.as_fd(), name, uid, gid, None));
            if let (Err(_), Some(q)) = (&made, quota) {
                q.adjust(-(len as i64));
            }
            made?;
            self.graft_child(&p, name)
        })())
    }

    /// link hook: `Some` when either side is under a graft.
    pub(crate) fn graft_link(
        &self,
        ino: Ino,
        newparent: Ino,
        newname: &OsStr,
    ) -> Option<Result<Entry>> {
        let src = self.graft_dir(ino);
        let dst = self.graft_dir(newparent);
        let (inode, gi, p) = match (src, dst) {
            (None, None) => return None,
            (Some((inode, a)), Some((p, b))) if a == b => (inode, a, p),
            _ => return Some(Err(Errno::XDEV)),
        };
        Some((|| {
            if inode.is_dir() {
                return Err(Errno::PERM);
            }
            let pfd = self.graft_new_name(&p, gi, newname)?;
            let (src_dir, src_name, _) = self.entry_loc(&inode)?;
            sys::fs::link_at(src_dir.as_fd(), &src_name, pfd.as_fd(), newname)?;
            self.graft_child(&p, newname)
        })())
    }

    /// unlink/rmdir hook: plain removal under a graft; EBUSY for a graft point or one
    /// of its ancestors.
    pub(crate) fn graft_remove(&self, parent: Ino, name: &OsStr, dir: bool) -> Option<Result<()>> {
        let Some((p, gi)) = self.graft_dir(parent) else {
            return self.grafts.pinned(parent, name).then_some(Err(Errno::BUSY));
        };
        Some((|| {
            check_name(name)?;
            self.graft_check_writable(gi)?;
            let layer = self.grafts.list[gi].layer;
            let pfd = self.dir_fd(&p, layer)?;
            let st = sys::fs::stat_at(pfd.as_fd(), name)?;
            let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
            match (dir, is_dir) {
                (true, false) => return Err(Errno::NOTDIR),
                (false, true) => return Err(Errno::ISDIR),
                _ => {}
            }
            let child = self.inodes.by_identity(tagged_key(layer, &st));
            let pinned = match (&child, is_dir) {
                (Some(_), false) => pin_entry(pfd.as_fd(), name),
                _ => None,
            };
            if is_dir {
                sys::fs::rmdir_at(pfd.as_fd(), name)?;
            } else {
                sys::fs::unlink_at(pfd.as_fd(), name)?;
                self.graft_release_space(gi, &st);
            }
            if let Some(c) = child {
                let mut cs = c.state.write();
                if cs.parent == parent && cs.name == name {
                    cs.detached = true;
                    cs.pinned = pinned;
                }
            }
            Ok(())
        })())
    }

    /// Gives back the bytes of a removed last link.
    fn graft_release_space(&self, gi: usize, st: &Stat) {
        let kind = st.st_mode & libc::S_IFMT;
        if let Some(q) = &self.grafts.list[gi].quota {
            if (kind == libc::S_IFREG || kind == libc::S_IFLNK) && st.st_nlink <= 1 {
                q.adjust(-st.st_size);
            }
        }
    }

    /// rename hook: plain rename within one graft; EXDEV across a graft boundary;
    /// EBUSY for a graft point or one of its ancestors, on either side.
    pub(crate) fn graft_rename(
        &self,
        parent: Ino,
        name: &OsStr,
        newparent: Ino,
        newname: &OsStr,
        mode: RenameMode,
    ) -> Option<Result<()>> {
        if self.grafts.list.is_empty() {
            return None;
        }
        let src = self.graft_dir(parent);
        let dst = self.graft_dir(newparent);
        let (p, q, gi) = match (src, dst) {
            (None, None) => {
                let busy =
                    self.grafts.pinned(parent, name) || self.grafts.pinned(newparent, newname);
                return busy.then_some(Err(Errno::BUSY));
            }
            (Some((p, a)), Some((q, b))) if a == b => (p, q, a),
            (None, Some(_)) if self.grafts.pinned(parent, name) => return Some(Err(Errno::BUSY)),
            _ => return Some(Err(Errno::XDEV)),
        };
        Some((|| {
            check_name(name)?;
            check_name(newname)?;
            self.graft_check_writable(gi)?;
            let layer = self.grafts.list[gi].layer;
            let pfd = self.dir_fd(&p, layer)?;
            let qfd = self.dir_fd(&q, layer)?;
            let src_st = sys::fs::stat_at(pfd.as_fd(), name)?;
            let dst_st = match sys::fs::stat_at(qfd.as_fd(), newname) {
                Ok(st) => Some(st),
                Err(Errno::NOENT) => None,
                Err(e) => return Err(e),
            };
            let same = dst_st
                .as_ref()
                .is_some_and(|d| (d.st_dev, d.st_ino) == (src_st.st_dev, src_st.st_ino));
            let src_inode = self.inodes.by_identity(tagged_key(layer, &src_st));
            let dst_inode = dst_st
                .as_ref()
                .and_then(|d| self.inodes.by_identity(tagged_key(layer, d)));
            let kind = match mode {
                RenameMode::Replace => RenameKind::Replace,
                RenameMode::NoReplace => RenameKind::NoReplace,
                RenameMode::Exchange => RenameKind::Exchange,
            };
            let pinned = match (&dst_inode, &dst_st) {
                (Some(_), Some(d)) if mode != RenameMode::Exchange && !same => {
                    if d.st_mode & libc::S_IFMT != libc::S_IFDIR {
                        pin_entry(qfd.as_fd(), newname)
                    } else {
                        None
                    }
                }
                _ => None,
            };
            sys::fs::rename_at(pfd.as_fd(), name, qfd.as_fd(), newname, kind)?;
            if same {
                return Ok(());
            }
            if let Some(s) = &src_inode {
                set_name(s, newparent, newname);
            }
            match (mode, dst_inode, &dst_st) {
                (RenameMode::Exchange, Some(d), _) => set_name(&d, parent, name),
                (RenameMode::Exchange, None, _) => {}
                (_, d, Some(st)) => {
                    self.graft_release_space(gi, st);
                    if let Some(d) = d {
                        let mut ds = d.state.write();
                        ds.detached = true;
                        ds.pinned = pinned;
                    }
                }
                _ => {}
            }
            Ok(())
        })())
    }

    /// readdir hook for a graft directory: its plain listing (no whiteout logic).
    pub(crate) fn graft_snapshot(&self, inode: &Inode) -> Option<Result<Vec<DirEntry>>> {
        let gi = self.graft_index(inode)?;
        Some((|| {
            let layer = self.grafts.list[gi].layer;
            let fd = self.dir_fd(inode, layer)?;
            let dev = self.layer(layer)?.dev;
            let parent = inode.state.read().parent;
            let mut entries = vec![
                DirEntry {
                    ino: inode.ino,
                    next_offset: 1,
                    kind: libc::S_IFDIR,
                    name: ".".into(),
                },
                DirEntry {
                    ino: parent,
                    next_offset: 2,
                    kind: libc::S_IFDIR,
                    name: "..".into(),
                },
            ];
            for raw in sys::fs::read_dir(fd.as_fd())? {
                let key = (dev ^ ((layer as u64 + 1) << 56), raw.ino);
                let ino = match self.inodes.by_identity(key) {
                    Some(i) => i.ino,
                    None => self.derived_ino(layer, raw.ino),
                };
                let kind = match raw.kind {
                    0 => match sys::fs::stat_at(fd.as_fd(), &raw.name) {
                        Ok(st) => st.st_mode & libc::S_IFMT,
                        Err(_) => continue,
                    },
                    k => k,
                };
                let next_offset = entries.len() as u64 + 1;
                entries.push(DirEntry {
                    ino,
                    next_offset,
                    kind,
                    name: raw.name,
                });
            }
            Ok(entries)
        })())
    }

    /// readdir hook for a union directory holding graft points: each is listed (even
    /// where the layers hide the scaffold's entry) with the graft root's number.
    pub(crate) fn graft_fix_listing(&self, dir: Ino, entries: &mut Vec<DirEntry>) {
        let Some(points) = self.grafts.points.get(&dir) else {
            return;
        };
        for (name, gi) in points {
            let layer = self.grafts.list[*gi].layer;
            let Ok(l) = self.layer(layer) else { continue };
            let Ok(st) = sys::fs::fstat(l.root_fd()) else {
                continue;
            };
            let ino = match self.inodes.by_identity(tagged_key(layer, &st)) {
                Some(i) => i.ino,
                None => self.derived_ino(layer, st.st_ino),
            };
            match entries.iter_mut().find(|e| &e.name == name) {
                Some(e) => {
                    e.ino = ino;
                    e.kind = libc::S_IFDIR;
                }
                None => {
                    let next_offset = entries.len() as u64 + 1;
                    entries.push(DirEntry {
                        ino,
                        next_offset,
                        kind: libc::S_IFDIR,
                        name: name.clone(),
                    });
                }
            }
        }
    }

    /// statfs as seen from `ino`: under a graft, the volume's filesystem, its blocks
    /// capped by the size limit when there is one; elsewhere the union's.
    pub fn statfs_at(&self, ino: Ino) -> Result<StatFs> {
        let Some((_, gi)) = self.graft_dir(ino) else {
            return self.statfs();
        };
        let graft = &self.grafts.list[gi];
        let st = sys::fs::fstatfs(self.layer(graft.layer)?.root_fd())?;
        let mut out = StatFs {
            blocks: st.f_blocks,
            bfree: st.f_bfree,
            bavail: st.f_bavail,
            files: st.f_files,
            ffree: st.f_ffree,
            bsize: st.f_bsize as u32,
            namelen: 255,
            frsize: st.f_frsize as u32,
        };
        if let Some(q) = &graft.quota {
            let unit = u64::from(out.frsize.max(1));
            let free = q.limit().saturating_sub(q.used()) / unit;
            out.blocks = q.limit() / unit;
            out.bfree = out.bfree.min(free);
            out.bavail = out.bavail.min(free);
        }
        Ok(out)
    }

    /// Reserves the growth of `ino` to the size `new_size(current size)` when it lies
    /// in a size-limited volume (ENOSPC when that does not fit). The returned charge
    /// settles the ledger with the size actually reached when dropped, after the
    /// operation.
    pub(crate) fn quota_charge(
        &self,
        ino: Ino,
        new_size: impl FnOnce(u64) -> u64,
    ) -> Result<Option<QuotaCharge<'_>>> {
        let Some((inode, gi)) = self.graft_dir(ino) else {
            return Ok(None);
        };
        let Some(quota) = &self.grafts.list[gi].quota else {
            return Ok(None);
        };
        let serial = quota.serialize();
        let old = self.stat_inode(&inode)?.st_size as u64;
        let reserved = new_size(old).saturating_sub(old);
        quota.reserve(reserved)?;
        Ok(Some(QuotaCharge {
            union: self,
            quota,
            inode,
            old,
            reserved,
            _serial: serial,
        }))
    }

    /// `quota_charge` for fallocate(2) `mode`. Allocation beyond the end of file that
    /// keeps the size would use space the apparent-size accounting cannot see, so it
    /// is refused on a size-limited volume.
    pub(crate) fn quota_fallocate(
        &self,
        ino: Ino,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> Result<Option<QuotaCharge<'_>>> {
        let end = offset.saturating_add(length);
        let mut beyond_eof_kept = false;
        let charge = self.quota_charge(ino, |old| {
            if mode & libc::FALLOC_FL_INSERT_RANGE != 0 {
                old.saturating_add(length)
            } else if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_COLLAPSE_RANGE) != 0 {
                old
            } else if mode & libc::FALLOC_FL_KEEP_SIZE != 0 {
                beyond_eof_kept = end > old;
                old
            } else {
                old.max(end)
            }
        })?;
        if beyond_eof_kept && charge.is_some() {
            return Err(Errno::OPNOTSUPP);
        }
        Ok(charge)
    }

    /// Fills an empty volume from the merged directory `src` it is grafted over; the
    /// volume's root takes that directory's owner and mode, as with docker.
    fn populate_root(&self, src: Ino, root: BorrowedFd<'_>) -> Result<()> {
        self.populate_dir(src, root)?;
        let attr = self.getattr(src)?;
        sys::fs::fchown(root, Some(attr.uid), Some(attr.gid))?;
        sys::fs::chmod_fd(root, attr.mode & 0o7777)
    }

    /// Copies the merged directory `src` into the (empty) volume directory `dst`:
    /// data, owners, modes, xattrs and times.
    fn populate_dir(&self, src: Ino, dst: BorrowedFd<'_>) -> Result<()> {
        let fh = self.opendir(src)?;
        let listing = self.readdir(fh, 0);
        self.releasedir(fh);
        for e in listing?.iter().filter(|e| e.name != "." && e.name != "..") {
            let entry = self.lookup(src, &e.name)?;
            let copied = self.populate_entry(&entry.attr, &e.name, dst);
            self.forget(entry.attr.ino, 1);
            copied?;
        }
        Ok(())
    }

    fn populate_entry(&self, attr: &Attr, name: &OsStr, dst: BorrowedFd<'_>) -> Result<()> {
        let perm = attr.mode & 0o7777;
        match attr.kind() {
            libc::S_IFDIR => {
                sys::fs::mkdir_at(dst, name, 0o700)?;
                let sub = sys::fs::open_dir(dst, name)?;
                self.populate_dir(attr.ino, sub.as_fd())?;
            }
            libc::S_IFREG => {
                let inode = self.inode(attr.ino)?;
                let (pfd, real, _) = self.entry_loc(&inode)?;
                let from = sys::fs::open_at(pfd.as_fd(), &real, OFlags::RDONLY, 0)?;
                let to = sys::fs::open_at(
                    dst,
                    name,
                    OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
                    0o600,
                )?;
                copy_data(&from, &to, attr.size)?;
            }
            libc::S_IFLNK => {
                let target = self.readlink(attr.ino)?;
                sys::fs::symlink_at(&target, dst, name)?;
            }
            kind => sys::fs::mknod_at(dst, name, kind | perm, attr.rdev)?,
        }
        sys::fs::chown_at(dst, name, Some(attr.uid), Some(attr.gid))?;
        if attr.kind() != libc::S_IFLNK {
            sys::fs::chmod_at(dst, name, perm)?;
        }
        if self.opts.xattrs {
            for x in self.listxattr(attr.ino).unwrap_or_default() {
                let Ok(value) = self.getxattr(attr.ino, &x) else {
                    continue;
                };
                if let Err(e) = sys::xattr::set(Target::Entry(dst, name), &x, &value, 0) {
                    log::warn!("filling a volume: xattr {x:?} of {name:?} not copied: {e}");
                }
            }
        }
        let at = |t: super::Time| TimeSpec::At {
            sec: t.sec,
            nsec: t.nsec,
        };
        sys::fs::utimens_at(dst, name, at(attr.atime), at(attr.mtime))
    }
}

/// A size change in progress on a size-limited volume (see `Union::quota_charge`).
pub(crate) struct QuotaCharge<'a> {
    union: &'a Union,
    quota: &'a Quota,
    inode: Arc<Inode>,
    old: u64,
    reserved: u64,
    _serial: parking_lot::ArcMutexGuard<parking_lot::RawMutex, ()>,
}

impl Drop for QuotaCharge<'_> {
    fn drop(&mut self) {
        // A file removed meanwhile had its bytes given back by the removal.
        let new = match self.union.stat_inode(&self.inode) {
            Ok(st) => st.st_size as u64,
            Err(_) => self.old + self.reserved,
        };
        let delta = new as i128 - self.old as i128 - self.reserved as i128;
        self.quota
            .adjust(delta.clamp(i64::MIN as i128, i64::MAX as i128) as i64);
    }
}

/// Whether a directory has no entries.
fn is_empty(dir: BorrowedFd<'_>) -> Result<bool> {
    Ok(sys::fs::read_dir(dir)?.is_empty())
}

/// The daemon's own credentials, for directories it makes at mount time.
fn daemon_caller() -> Caller {
    let (uid, gid) = sys::process::ids();
    Caller { uid, gid, pid: 0 }
}
