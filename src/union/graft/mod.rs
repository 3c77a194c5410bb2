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

mod fill;
mod ops;
mod quota;
mod scaffold;

pub(crate) use scaffold::Scaffold;

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use super::dispatch::{Backing, Route};
use super::inode::{Inode, InodeState, LayerRef};
use super::lookup::Found;
use super::readdir::DirEntry;
use super::{Caller, Entry, Errno, Ino, ROOT_INO, Result, Setup, StatFs, Union};
use crate::config::{GraftSource, MountConfig};
use crate::layer::LayerIdx;
use crate::sys::{self, fs::Stat};
use crate::volume::attach::GraftSources;
use crate::volume::claims::Claim;
use crate::volume::quota::Quota;

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
    _scaffold: Option<scaffold::Scaffold>,
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

pub(crate) fn graft_name(source: &GraftSource) -> String {
    match source {
        GraftSource::Volume(n) => format!("volume {n}"),
        GraftSource::Bind(p) => format!("bind {}", p.display()),
    }
}

fn tagged_key(layer: LayerIdx, st: &Stat) -> (u64, u64) {
    (st.st_dev ^ ((layer as u64 + 1) << 56), st.st_ino)
}

impl Union {
    /// Refuses graft targets the layers cannot take, before anything is created for the
    /// mount (volumes, claims, workdir/{work,index}): each target is walked on a
    /// read-only view of the layers (upper and lowers as lowers, no workdir, no grafts),
    /// so a refused mount leaves nothing behind. A missing component is fine (it is
    /// created later); one that is not a directory is not. `install_grafts` meets the
    /// same refusals should the layers change in between.
    pub(crate) fn check_graft_targets(
        config: &MountConfig,
        setup: &Setup,
    ) -> std::result::Result<(), String> {
        if config.grafts.is_empty() {
            return Ok(());
        }
        let mut view = config.clone();
        view.lowerdirs = config
            .upperdir
            .iter()
            .chain(&config.lowerdirs)
            .cloned()
            .collect();
        view.upperdir = None;
        view.workdir = None;
        view.grafts.clear();
        let union = Union::new(&view, setup, GraftSources::none()).map_err(|e| e.to_string())?;
        for spec in &config.grafts {
            let what = graft_name(&spec.source);
            let target = spec.target.display();
            let mut parent = ROOT_INO;
            let comps: Vec<&OsStr> = spec.target.iter().skip(1).collect();
            for (i, comp) in comps.iter().enumerate() {
                let attr = match union.lookup(parent, comp) {
                    Ok(e) => e.attr,
                    Err(e) if e == Errno::NOENT => break,
                    Err(e) => return Err(format!("{what}: {target}: {e}")),
                };
                if attr.kind() != libc::S_IFDIR {
                    return Err(if i + 1 == comps.len() {
                        format!("{what}: {target} is not a directory in the layers")
                    } else {
                        format!("{what}: {target}: a path component is not a directory")
                    });
                }
                parent = attr.ino;
            }
        }
        Ok(())
    }

    /// The identity key lookup registers for the object `st` of `layer`: tagged with
    /// the layer in a graft (whose sources may share a filesystem with the layers).
    pub(crate) fn identity_key(&self, layer: LayerIdx, st: &Stat) -> (u64, u64) {
        if self.grafts.list.iter().any(|g| g.layer == layer) {
            tagged_key(layer, st)
        } else {
            (st.st_dev, st.st_ino)
        }
    }

    /// Attaches the prepared grafts: makes sure each target's ancestors exist, fills
    /// empty named volumes from the content they cover, pins the ancestors, and opens
    /// the quotas. Called once from `Union::new`, before anything is served.
    pub(crate) fn install_grafts(
        &mut self,
        config: &MountConfig,
        scaffold_dir: Option<scaffold::Scaffold>,
        sources: GraftSources,
    ) -> std::result::Result<(), String> {
        let GraftSources {
            volumes, claims, ..
        } = sources;
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
                    Err(e) if e == Errno::NOENT && self.upper => self
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
                Err(e) if e == Errno::NOENT => None,
                Err(e) => return Err(format!("{what}: {target}: {e}")),
            };
            let root = self.layer(layer).map_err(|e| e.to_string())?.root.clone();
            if let (Some(src), Some((vol, _lock))) = (covered, &volume) {
                if !spec.nocopy && fill::is_empty(root.as_fd()).map_err(|e| e.to_string())? {
                    if let Some(limit) = vol.meta.size_limit {
                        let needed = self
                            .fill_usage(src)
                            .map_err(|e| format!("{what}: sizing the content at {target}: {e}"))?;
                        if needed > limit {
                            return Err(format!(
                                "{what}: the image content at {target} ({needed} bytes) does \
                                 not fit its size limit ({limit} bytes)"
                            ));
                        }
                    }
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

    /// What backs `inode`: the union's layers, or the directory of graft `gi` (an
    /// inode belongs to the graft whose layer holds it: grafts are the last layers).
    pub(crate) fn backing(&self, inode: &Inode) -> Backing {
        if self.grafts.list.is_empty() {
            return Backing::Merged;
        }
        let graft = inode.state.read().top_layer().and_then(|top| {
            top.checked_sub(self.grafts.base)
                .filter(|i| *i < self.grafts.list.len())
        });
        match graft {
            Some(gi) => Backing::Graft(gi),
            None => Backing::Merged,
        }
    }

    /// [`Union::backing`] of the inode numbered `ino`, with the inode when it is a
    /// graft's. An inode the table does not hold is left to the union code, which
    /// answers ESTALE for it.
    pub(crate) fn route(&self, ino: Ino) -> Route {
        if self.grafts.list.is_empty() {
            return Route::Merged;
        }
        let Ok(inode) = self.inode(ino) else {
            return Route::Merged;
        };
        match self.backing(&inode) {
            Backing::Graft(gi) => Route::Graft(inode, gi),
            Backing::Merged => Route::Merged,
        }
    }

    /// Whether `name` in `parent` is a graft point or leads to one: it cannot be
    /// removed or renamed (EBUSY).
    pub(crate) fn pins_a_graft(&self, parent: Ino, name: &OsStr) -> bool {
        !self.grafts.list.is_empty() && self.grafts.pinned(parent, name)
    }

    /// The graft whose root is `name` in the merged directory `parent`, if any.
    pub(crate) fn graft_point(&self, parent: Ino, name: &OsStr) -> Option<usize> {
        self.grafts.point(parent, name)
    }

    pub(crate) fn graft_check_writable(&self, gi: usize) -> Result<()> {
        if self.grafts.list[gi].read_only {
            Err(Errno::ROFS.into())
        } else {
            Ok(())
        }
    }

    /// Cache lifetime of `ino`'s attributes.
    pub fn attr_ttl(&self, ino: Ino) -> Duration {
        match self.route(ino) {
            Route::Graft(..) => GRAFT_TTL,
            Route::Merged => self.opts.ttl,
        }
    }

    /// Whether `ino` lies under a graft (its data may change behind the kernel's back).
    pub fn is_grafted(&self, ino: Ino) -> bool {
        matches!(self.route(ino), Route::Graft(..))
    }

    /// Whether every write to `ino` must reach the daemon (it is size-limited), so
    /// that it cannot be opened with passthrough.
    pub fn io_needs_daemon(&self, ino: Ino) -> bool {
        match self.route(ino) {
            Route::Graft(_, gi) => self.grafts.list[gi].quota.is_some(),
            Route::Merged => false,
        }
    }

    /// Whether graft `gi` is mounted read-only.
    pub(crate) fn graft_read_only(&self, gi: usize) -> bool {
        self.grafts.list[gi].read_only
    }

    /// The entry of graft `gi`'s root, as `name` in the merged directory `parent`.
    pub(crate) fn graft_root_entry(&self, gi: usize, parent: Ino, name: &OsStr) -> Result<Entry> {
        let layer_idx = self.grafts.list[gi].layer;
        let layer = self.layer(layer_idx)?;
        let st = sys::fs::fstat(layer.root_fd())?;
        let key = tagged_key(layer_idx, &st);
        let inode = match self.inodes.reference_by_identity(key) {
            Some(inode) => inode,
            None => {
                // The root keeps its fd whatever the budget (it is not noted in the
                // fd cache): it cannot be re-opened from its parent, which is not in
                // the graft's layer.
                let state = InodeState::new_dir(
                    parent,
                    name.to_os_string(),
                    vec![LayerRef {
                        layer: layer_idx,
                        fd: Some(layer.root.clone()),
                    }],
                    vec![key],
                    None,
                );
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
    pub(crate) fn graft_child(&self, p: &Inode, name: &OsStr) -> Result<Entry> {
        sys::fs::check_component(name)?;
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
            redirect: None,
            chained: false,
        };
        let inode = self.adopt(p.ino, name, found)?;
        Ok(Entry {
            attr: self.getattr(inode.ino)?,
            ttl: GRAFT_TTL,
        })
    }

    /// The listing of the directory `inode` of graft `gi`: its plain listing (no
    /// whiteout logic).
    pub(crate) fn graft_snapshot(&self, inode: &Inode, gi: usize) -> Result<Vec<DirEntry>> {
        let layer = self.grafts.list[gi].layer;
        let fd = self.dir_fd(inode, layer)?;
        let dev = self.layer(layer)?.dev;
        let mut entries = super::readdir::dot_entries(inode);
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
                listed_in: None,
            });
        }
        Ok(entries)
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
                    e.listed_in = None;
                }
                None => {
                    let next_offset = entries.len() as u64 + 1;
                    entries.push(DirEntry {
                        ino,
                        next_offset,
                        kind: libc::S_IFDIR,
                        name: name.clone(),
                        listed_in: None,
                    });
                }
            }
        }
    }

    /// statfs as seen from `ino`: under a graft, the volume's filesystem, its blocks
    /// capped by the size limit when there is one; elsewhere the union's.
    pub fn statfs_at(&self, ino: Ino) -> Result<StatFs> {
        let Route::Graft(_, gi) = self.route(ino) else {
            return self.statfs();
        };
        let graft = &self.grafts.list[gi];
        let mut out = StatFs::of(self.layer(graft.layer)?.root_fd())?;
        if let Some(q) = &graft.quota {
            let unit = u64::from(out.frsize.max(1));
            let free = q.limit().saturating_sub(q.used()) / unit;
            out.blocks = q.limit() / unit;
            out.bfree = out.bfree.min(free);
            out.bavail = out.bavail.min(free);
        }
        Ok(out)
    }
}

/// The daemon's own credentials, for directories it makes at mount time.
fn daemon_caller() -> Caller {
    let (uid, gid) = sys::process::ids();
    Caller { uid, gid, pid: 0 }
}
