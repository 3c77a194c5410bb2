//! Opening a union: the layers, the work directory and the grafts of a mount
//! configuration, and the errors that refuse it.

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use dashmap::DashMap;

use super::inode::{InodeState, InodeTable, LayerRef, ROOT_INO};
use super::whiteout::{self, SHARED_WHITEOUT, WhiteoutStyle, XattrNs};
use super::{DEFAULT_TTL, Error, Options, Result, Union, graft, hardlink, owner, remove_tree};
use crate::config::MountConfig;
use crate::layer::{Layer, assign_ino_bits};
use crate::sys::xattr::Target;
use crate::sys::{self, Errno};
use crate::volume::attach::GraftSources;

/// What only the caller may decide, because it acts on the whole process or on
/// data the caller owns: the engine never raises limits or clears directories on
/// its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setup {
    /// Directory fds the inode table may keep cached (see `InodeTable::fd_cache`).
    pub fd_budget: u64,
    /// What becomes of entries an earlier mount left in `workdir/work`.
    pub stale_work: StaleWork,
}

/// Entries in `workdir/work` when a union opens: only ever staged copies of a
/// mount that ended mid-operation, never user data (see [`Workdir::work`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleWork {
    /// Removed, as kernel overlayfs does at mount.
    Clear,
    /// The union is not opened ([`SetupError::StaleWork`]).
    Refuse,
}

impl Setup {
    /// What a mount uses: the open-file limit raised as far as the process may
    /// (this changes the whole process; a daemon owns its process), half of it for
    /// cached directory fds, and an earlier mount's staged leftovers cleared.
    pub fn for_mount() -> Setup {
        Setup {
            fd_budget: sys::process::raise_nofile_limit() / 2,
            stale_work: StaleWork::Clear,
        }
    }

    /// Changes nothing outside the layers: half the current open-file limit for
    /// cached directory fds, and a workdir holding staged leftovers refused.
    pub fn unintrusive() -> Setup {
        Setup {
            fd_budget: sys::process::nofile_limit() / 2,
            stale_work: StaleWork::Refuse,
        }
    }
}

/// Why a union cannot be opened. Each names the path or graft concerned.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// `role` is the option that gave the directory: upperdir, lowerdir, workdir.
    #[error("{role} {}: {source}", path.display())]
    Layer {
        role: &'static str,
        path: PathBuf,
        source: Errno,
    },
    #[error("no layers given")]
    NoLayers,
    #[error("upperdir needs a workdir")]
    NoWorkdir,
    #[error(
        "{}: holds entries staged by an earlier mount; remove them or let the union clear them (StaleWork::Clear)",
        .0.display()
    )]
    StaleWork(PathBuf),
    #[error("layer roots: {0}")]
    LayerRoots(Error),
    /// A volume or bind mount that cannot be attached; the message names it and its
    /// target in the merged view.
    #[error("{0}")]
    Graft(String),
}

impl SetupError {
    fn layer(role: &'static str, path: &Path, source: Errno) -> SetupError {
        SetupError::Layer {
            role,
            path: path.to_path_buf(),
            source,
        }
    }
}

impl Union {
    /// Opens the layers of `config` and prepares the work directory as `setup`
    /// allows. Fails naming the path (and the layer's role) that cannot be used.
    /// `grafts` are the opened sources of `config.grafts` (`volume::attach::open`).
    pub fn new(
        config: &MountConfig,
        setup: &Setup,
        mut grafts: GraftSources,
    ) -> std::result::Result<Union, SetupError> {
        let mut layers = Vec::new();
        if let Some(upper) = &config.upperdir {
            layers.push(Layer::open(upper).map_err(|e| SetupError::layer("upperdir", upper, e))?);
        }
        for lower in &config.lowerdirs {
            layers.push(
                Layer::open_lower(lower).map_err(|e| SetupError::layer("lowerdir", lower, e))?,
            );
        }
        if layers.is_empty() {
            return Err(SetupError::NoLayers);
        }
        if grafts.layers.len() != config.grafts.len() {
            return Err(SetupError::Graft(format!(
                "{} graft sources opened for {} grafts",
                grafts.layers.len(),
                config.grafts.len()
            )));
        }
        let scaffold = match config.grafts.is_empty() {
            true => None,
            false => Some(graft::Scaffold::build(config).map_err(SetupError::Graft)?),
        };
        let scaffold_dir = scaffold.map(|(layer, dir)| {
            layers.push(layer);
            dir
        });
        let graft_base = layers.len();
        layers.append(&mut grafts.layers);
        assign_ino_bits(&mut layers);
        let upper = config.upperdir.is_some();
        let workdir = match (&config.upperdir, &config.workdir) {
            (Some(_), Some(workdir)) => Some(prepare_workdir(
                workdir,
                config.aufs_whiteouts,
                setup.stale_work,
            )?),
            (Some(_), None) => return Err(SetupError::NoWorkdir),
            _ => None,
        };
        let whiteout_style = workdir
            .as_ref()
            .map_or(WhiteoutStyle::CharDevice, |w| w.whiteout_style);
        let xattr_ns = workdir.as_ref().map_or(XattrNs::User, |w| w.xattr_ns);
        let (work, index, workdir_root) = match workdir {
            Some(w) => (
                Some(Arc::new(w.work)),
                Some(Arc::new(w.index)),
                Some(w.root),
            ),
            None => (None, None, None),
        };
        let opts = Options {
            read_only: config.read_only(),
            syncs: config.syncs(),
            ttl: config.timeout.unwrap_or(DEFAULT_TTL),
            xattrs: !config.noxattrs,
            redirect_dir: config.redirect_dir.as_deref() != Some("off"),
            metacopy: config.metacopy,
            acl: !config.noacl,
            noatime: config.fuse.atime == Some(false),
        };
        let owner = owner::OwnerPolicy::new(config, &layers);
        let mut union = Union {
            layers,
            upper,
            work,
            index,
            workdir_root,
            whiteout_style,
            xattr_ns,
            indexed: Default::default(),
            removed_links: Default::default(),
            inodes: InodeTable::new(setup.fd_budget),
            files: DashMap::new(),
            dirs: DashMap::new(),
            next_handle: AtomicU64::new(1),
            next_temp: AtomicU64::new(1),
            reflink: std::sync::atomic::AtomicBool::new(true),
            shared_whiteout: std::sync::atomic::AtomicBool::new(true),
            pid: std::process::id(),
            opts,
            owner,
            stale_attr_hook: std::sync::OnceLock::new(),
            grafts: graft::Grafts::new(graft_base),
        };
        union.insert_root().map_err(SetupError::LayerRoots)?;
        union
            .install_grafts(config, scaffold_dir, grafts)
            .map_err(SetupError::Graft)?;
        if !union.opts.read_only {
            if let Err(e) = union.load_removed_links() {
                log::warn!("link counts of earlier removals not restored: {e}");
            }
            if let Err(e) = union.load_index() {
                log::warn!(
                    "reading {}: copied-up hard links not linked: {e}",
                    hardlink::INDEX_DIR
                );
            }
        }
        Ok(union)
    }

    fn insert_root(&self) -> Result<()> {
        let mut refs = Vec::new();
        // Graft layers are not part of the merged tree; they hang off graft points.
        let union_layers = &self.layers[..self.grafts.base];
        for (idx, layer) in union_layers.iter().enumerate() {
            refs.push(LayerRef {
                layer: idx,
                fd: Some(layer.root.clone()),
            });
            // An opaque lower root hides the layers below it, as for any directory.
            if idx + 1 < union_layers.len() && whiteout::dir_is_opaque(layer.root_fd())? {
                break;
            }
        }
        let top = &self.layers[0];
        let st = sys::fs::fstat(top.root_fd())?;
        let state = InodeState::new_dir(
            ROOT_INO,
            Default::default(),
            refs,
            vec![(st.st_dev, st.st_ino)],
            None,
        );
        self.inodes.insert(ROOT_INO, libc::S_IFDIR, state);
        Ok(())
    }
}

/// What the work directory gives a writable mount.
struct Workdir {
    /// `workdir/work`: staging for copy-ups and new entries; emptied at mount (a crash
    /// during a copy-up leaves only staged copies there, never user data).
    work: OwnedFd,
    /// The work directory itself, which holds the shared whiteout
    /// ([`SHARED_WHITEOUT`]) beside `work` and the index.
    root: OwnedFd,
    /// `workdir/#stratafs-index` ([`hardlink::INDEX_DIR`]): the copies of lower
    /// hard-link groups, to which their names are linked as they are reached.
    index: OwnedFd,
    whiteout_style: WhiteoutStyle,
    xattr_ns: XattrNs,
}

/// Prepares `workdir/work` and the index, and probes what this process may
/// write: char-device whiteouts (unless `aufs` asks for `.wh.` files anyway),
/// trusted.* xattrs.
fn prepare_workdir(
    workdir: &Path,
    aufs: bool,
    stale: StaleWork,
) -> std::result::Result<Workdir, SetupError> {
    let fail = |e| SetupError::layer("workdir", workdir, e);
    let root = sys::fs::open_root(workdir).map_err(fail)?;
    let open_sub = |name: &OsStr| -> sys::SysResult<OwnedFd> {
        match sys::fs::mkdir_at(root.as_fd(), name, 0o700) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(e),
        }
        sys::fs::open_dir(root.as_fd(), name)
    };
    let work = open_sub(OsStr::new("work")).map_err(fail)?;
    let leftovers = sys::fs::read_dir(work.as_fd()).map_err(fail)?;
    match stale {
        StaleWork::Clear => {
            for entry in leftovers {
                remove_tree(work.as_fd(), &entry.name).map_err(fail)?;
            }
        }
        StaleWork::Refuse if !leftovers.is_empty() => {
            return Err(SetupError::StaleWork(workdir.join("work")));
        }
        StaleWork::Refuse => {}
    }
    let index = open_sub(OsStr::new(hardlink::INDEX_DIR)).map_err(fail)?;
    let probe = OsStr::new("#stratafs-whiteout-probe");
    let whiteout_style = if aufs {
        WhiteoutStyle::AufsFile
    } else {
        match sys::fs::mknod_at(work.as_fd(), probe, libc::S_IFCHR, 0) {
            Ok(()) => {
                let _ = sys::fs::unlink_at(work.as_fd(), probe);
                WhiteoutStyle::CharDevice
            }
            Err(_) => WhiteoutStyle::AufsFile,
        }
    };
    let trusted_probe = XattrNs::Trusted.own("probe");
    let xattr_ns = match sys::xattr::set(Target::Fd(work.as_fd()), &trusted_probe, b"y", 0) {
        Ok(()) => {
            let _ = sys::xattr::remove(Target::Fd(work.as_fd()), &trusted_probe);
            XattrNs::Trusted
        }
        Err(_) => XattrNs::User,
    };
    // Made anew by the first whiteout: one left by an earlier mount may be near the
    // link limit, and a mount must not depend on what it finds there.
    match sys::fs::unlink_at(root.as_fd(), OsStr::new(SHARED_WHITEOUT)) {
        Ok(()) | Err(Errno::NOENT) => {}
        Err(e) => return Err(fail(e)),
    }
    Ok(Workdir {
        work,
        root,
        index,
        whiteout_style,
        xattr_ns,
    })
}
