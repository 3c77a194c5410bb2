//! The validated description of one mount, shared by the option parser, the CLI,
//! the union engine and the FUSE adapter. Every field is already checked: code
//! that receives a `MountConfig` may rely on the invariants stated per field.

use std::path::PathBuf;
use std::time::Duration;

/// One `C:H:N` triple of `uidmapping=`/`gidmapping=`: an id `container+i` stored in a
/// layer is shown as `host+i` (fuse-overlayfs's direction; containers/storage passes
/// ContainerID:HostID:Size), and a shown `host+i` is stored back as `container+i`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMapping {
    pub container: u32,
    pub host: u32,
    pub count: u32,
}

/// How a graft (volume or bind) is attached at a path of the merged view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GraftSource {
    /// A named volume in the state directory.
    Volume(String),
    /// A host directory, used as is.
    Bind(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraftSpec {
    pub source: GraftSource,
    /// Absolute path inside the merged view, normalised (no `.`/`..`, no trailing `/`).
    pub target: PathBuf,
    pub read_only: bool,
    /// Do not populate an empty volume from the image content under `target`.
    pub nocopy: bool,
    /// `:nocreate`: a missing volume makes the mount fail instead of being created
    /// (checked by `cli` before mounting, and again when the mount takes the volume).
    pub nocreate: bool,
    /// `:delete`: a volume this mount creates is removed when the mount ends (a
    /// volume that existed before is kept). Never together with `nocreate`.
    pub delete: bool,
}

/// Standard FUSE/VFS mount flags. `None` means "not given": the mount uses the default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FuseFlags {
    pub allow_other: bool,
    pub allow_root: bool,
    pub default_permissions: bool,
    pub read_only: bool,
    pub suid: Option<bool>,
    pub dev: Option<bool>,
    pub exec: Option<bool>,
    pub atime: Option<bool>,
    pub max_write: Option<u32>,
    /// `fsname=` for /proc/mounts; defaults to "stratafs".
    pub fsname: Option<String>,
}

/// Everything one mount needs. Built by `options::parse` + `cli`, consumed by the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountConfig {
    /// Lower layers, top-most first. Non-empty; each an existing directory, symlinks resolved.
    pub lowerdirs: Vec<PathBuf>,
    /// Writable layer. `None` makes a read-only mount (every change answers EROFS).
    pub upperdir: Option<PathBuf>,
    /// Staging area on the upper's filesystem; `Some` exactly when `upperdir` is `Some`.
    pub workdir: Option<PathBuf>,
    pub mountpoint: PathBuf,
    pub uid_mappings: Vec<IdMapping>,
    pub gid_mappings: Vec<IdMapping>,
    pub squash_to_uid: Option<u32>,
    pub squash_to_gid: Option<u32>,
    /// 0: owners/modes are the real ones; 1: kept in `security.fuseoverlayfs.override_stat`;
    /// 2: kept in `user.containers.override_stat`.
    pub xattr_permissions: u8,
    /// Skip every sync (fuse-overlayfs `volatile`).
    pub volatile: bool,
    /// `fsync=0` turns fsync/fdatasync requests into no-ops.
    pub fsync: bool,
    /// Kernel writeback cache; disables passthrough when on.
    pub writeback: bool,
    /// Entry/attribute cache timeout for layer content. `None`: the engine default.
    pub timeout: Option<Duration>,
    /// Worker threads serving requests; 0 means "choose".
    pub threads: usize,
    pub static_nlink: bool,
    pub noacl: bool,
    pub noxattrs: bool,
    /// `redirect_dir=off` (and friends) as given; `None` means the default (on).
    pub redirect_dir: Option<String>,
    /// `metacopy=on`: chmod/chown/utimes/setxattr of a lower file copy up its
    /// metadata only; its data stays below until it is opened for writing.
    pub metacopy: bool,
    pub xino: Option<String>,
    pub context: Option<String>,
    /// Try FUSE passthrough for regular files (off when `writeback` or `passthrough=0`).
    pub passthrough: bool,
    /// Ask for FUSE-over-io_uring (falls back to /dev/fuse where not offered).
    pub io_uring: bool,
    pub fuse: FuseFlags,
    pub grafts: Vec<GraftSpec>,
    /// Overrides the volume state directory (`--state-dir`, STRATAFS_STATE_DIR).
    pub state_dir: Option<PathBuf>,
    /// fuse-overlayfs `auto_unmount`: mounted through fusermount3, which unmounts when
    /// the daemon dies (instead of leaving a dead mount that answers ENOTCONN).
    pub auto_unmount: bool,
    /// Write whiteouts as `.wh.NAME` files even where a char 0/0 could be made
    /// (fuse-overlayfs's FUSE_OVERLAYFS_DISABLE_OVL_WHITEOUT, honoured as is).
    pub aufs_whiteouts: bool,
}

impl MountConfig {
    /// A configuration with every option at its default, for the given layers.
    pub fn new(lowerdirs: Vec<PathBuf>, mountpoint: PathBuf) -> Self {
        MountConfig {
            lowerdirs,
            upperdir: None,
            workdir: None,
            mountpoint,
            uid_mappings: Vec::new(),
            gid_mappings: Vec::new(),
            squash_to_uid: None,
            squash_to_gid: None,
            xattr_permissions: 0,
            volatile: false,
            fsync: true,
            writeback: false,
            timeout: None,
            threads: 0,
            static_nlink: false,
            noacl: false,
            noxattrs: false,
            redirect_dir: None,
            metacopy: false,
            xino: None,
            context: None,
            passthrough: true,
            io_uring: false,
            fuse: FuseFlags::default(),
            grafts: Vec::new(),
            state_dir: None,
            auto_unmount: false,
            aufs_whiteouts: false,
        }
    }

    /// The resolved configuration, one line each, as `-d` prints it before mounting:
    /// what the mount will really use, with defaults filled in and the reason for
    /// each choice that options made indirectly.
    pub fn summary(&self) -> Vec<String> {
        let list = |v: &[PathBuf]| {
            v.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" : ")
        };
        let maps = |m: &[IdMapping]| {
            if m.is_empty() {
                "identity".to_string()
            } else {
                m.iter()
                    .map(|m| format!("{}->{} (x{})", m.container, m.host, m.count))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        let opt = |p: &Option<PathBuf>| {
            p.as_ref()
                .map_or("none".to_string(), |p| p.display().to_string())
        };
        let mut lines = vec![
            format!("config: mountpoint {}", self.mountpoint.display()),
            format!("config: lower layers (top first) {}", list(&self.lowerdirs)),
            format!(
                "config: upper {}, work {}{}",
                opt(&self.upperdir),
                opt(&self.workdir),
                if self.read_only() {
                    " (read-only mount)"
                } else {
                    ""
                }
            ),
            format!(
                "config: uids {}; gids {}; squash uid {} gid {}; xattr_permissions {}",
                maps(&self.uid_mappings),
                maps(&self.gid_mappings),
                self.squash_to_uid.map_or("-".into(), |u| u.to_string()),
                self.squash_to_gid.map_or("-".into(), |g| g.to_string()),
                self.xattr_permissions
            ),
            format!(
                "config: passthrough {}",
                if self.passthrough {
                    "on (where the kernel grants it: needs CAP_SYS_ADMIN)"
                } else if self.writeback {
                    "off (writeback=1 needs I/O served by the daemon)"
                } else {
                    "off (passthrough=0)"
                }
            ),
            format!(
                "config: transport {}",
                if self.io_uring {
                    "FUSE over io_uring where the kernel offers it (fuse.enable_uring), else /dev/fuse"
                } else {
                    "/dev/fuse"
                }
            ),
            format!(
                "config: sync {}, writeback cache {}, metacopy {}, redirect_dir {}, threads {}",
                if self.syncs() {
                    "on"
                } else if self.volatile {
                    "off (volatile)"
                } else {
                    "off (fsync=0)"
                },
                if self.writeback { "on" } else { "off" },
                if self.metacopy { "on" } else { "off" },
                self.redirect_dir.as_deref().unwrap_or("on"),
                if self.threads == 0 {
                    "auto".to_string()
                } else {
                    self.threads.to_string()
                }
            ),
        ];
        for g in &self.grafts {
            let source = match &g.source {
                GraftSource::Volume(n) => format!("volume {n}"),
                GraftSource::Bind(p) => format!("bind {}", p.display()),
            };
            lines.push(format!(
                "config: graft {source} at {}{}",
                g.target.display(),
                if g.read_only { " (read-only)" } else { "" }
            ));
        }
        lines
    }

    pub fn read_only(&self) -> bool {
        self.upperdir.is_none() || self.fuse.read_only
    }

    /// Whether data must reach the disk when a writer asks for it.
    pub fn syncs(&self) -> bool {
        self.fsync && !self.volatile
    }
}
