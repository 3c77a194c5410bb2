//! The union engine: a merged, copy-on-write view of the layers, addressed by inode
//! number like a FUSE filesystem but with no FUSE types. Every method returns
//! `Result<T, Error>` ([`Error`]: the errno a request is answered with and what was
//! being done, on which entry, from which layer); nothing here panics on any input.
//! Requests that depend on what backs an entry (the layers, or a graft's
//! directory) are routed once, in dispatch.rs.
//!
//! # LOCKING
//!
//! Every lock of the engine and of the FUSE adapter in front of it, what it
//! protects, and the order in which they may be taken (a lock may only be taken
//! while holding locks that come before it in this list; none is taken twice):
//!
//! 1. `StrataFs::io`, one mutex per inode (src/fuse/passthrough.rs): how that
//!    inode's opens do I/O, its backing file and open counts. Held across the
//!    backing-file ioctl and `Union::open_upper_rdwr` of a first passthrough open,
//!    so it comes before every engine lock; the engine never calls the adapter.
//! 2. `QuotaCharge::_serial` (`Quota::serial`, src/volume/quota.rs): one growing
//!    operation at a time on a size-limited volume, held for the whole write or
//!    truncate; under it `Quota::ledger` and the ledger file's flock (leaves).
//!    Volume files are never copied up, so no copy-up lock is taken under it.
//! 3. `Inode::copy_up` of a non-directory: one copy-up of that file at a time.
//!    Held over the copy of its data, and for a lower hard-link group
//!    (`copy_up_linked`) over the link of its name to the group's copy, which may
//!    copy up the parent directory (4) and takes `IndexedGroups::link_up` (4a). At
//!    most one non-directory copy-up lock is held by a thread: linking a name
//!    copies up directories only.
//! 4. `Inode::copy_up` of a directory: one copy-up of that directory at a time.
//!    `copy_up` takes them one at a time, from the top-most missing ancestor down
//!    ("towards the entry"), each released before the next; nothing under it
//!    copies up anything. So no thread holding a directory's lock waits for a
//!    file's or another directory's, and 3 -> 4 cannot close a cycle, whether the
//!    other thread is a rename (which holds no copy-up lock), a plain copy-up or
//!    another group's link-up.
//!    Between 4 and 5 comes `IndexedGroups::link_up` (hardlink.rs): one link of a
//!    name to a hard-link group's copy, with the update of the copy's link-count
//!    marker, at a time. Taken once the parent's copy-up is done (no directory lock
//!    held); under it only system calls on the index and upper layer and the group
//!    inode's state (6).
//! 5. `InodeTable::fd_cache`: the queue of cached directory handles; never held
//!    while taking another lock (the evicted inode's state is written after it is
//!    released).
//! 6. `Inode::state` (RwLock): the inode's layers, parent/name, redirect, keys and
//!    cached fds. Held only for short reads and writes of those fields, with no
//!    other inode's state taken under it and no system call that could block on a
//!    lock of this mount.
//! 7. Leaves, held for a map or field access only: the dashmaps of the inode
//!    table (`inodes`, `identity`) and of the open handles (`files`, `dirs`, the
//!    adapter's handle and exec maps), `DirHandle::entries`, `OpenFile::upper_copy`
//!    (`OnceLock`), `IndexedGroups::groups` and the removals' records.
//!
//! The kernel's own locks (the VFS locks of parent directories during a request)
//! are not in this order: the daemon works on the layers through its own fds and
//! never waits on a lock of this mount, so a request the kernel holds its locks
//! for always finishes.

mod acl;
mod attr;
mod copy_up;
mod dir_ops;
mod dispatch;
mod error;
mod file;
mod graft;
pub(crate) use graft::graft_name;
mod hardlink;
pub mod inode;
mod inode_flags;
mod lookup;
mod metacopy;
mod origin;
pub mod override_stat;
mod owner;
mod readdir;
mod redirect;
mod removed_links;
mod setup;
pub mod whiteout;
mod xattr;

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;

use crate::layer::{Layer, LayerIdx};
use crate::sys;
pub use crate::sys::Errno;
pub use acl::PrivChange;
pub use file::OpenFile;
#[cfg(feature = "testing")]
pub use graft::GRAFT_TTL;
use inode::InodeTable;
pub use inode::{Ino, ROOT_INO};
use whiteout::{WhiteoutStyle, XattrNs};

pub use error::{Error, Result, WithContext};
pub use setup::{Setup, SetupError, StaleWork};

pub type StaleAttrHook = Box<dyn Fn(Ino) + Send + Sync>;

/// Who is asking: the credentials new entries are created with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

impl Caller {
    /// The credentials the model tests and fuzz targets act with.
    #[cfg(feature = "testing")]
    pub const ROOT: Caller = Caller {
        uid: 0,
        gid: 0,
        pid: 0,
    };
}

/// A timestamp: seconds and nanoseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Time {
    pub sec: i64,
    pub nsec: u32,
}

/// Attributes of a merged entry, as the kernel should see them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    /// Type and permission bits (st_mode).
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub size: u64,
    pub blocks: u64,
    pub blksize: u32,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
}

impl Attr {
    pub fn kind(&self) -> u32 {
        self.mode & libc::S_IFMT
    }
}

/// A looked-up entry: the kernel now holds one more reference on `attr.ino`.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub attr: Attr,
    /// How long the kernel may cache the name and the attributes.
    pub ttl: Duration,
}

/// Which times a setattr changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetTime {
    Now,
    At(Time),
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

/// rename(2) flavours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenameMode {
    Replace,
    NoReplace,
    Exchange,
}

#[derive(Debug, Clone, Copy)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// Engine settings derived from the mount configuration.
#[derive(Debug, Clone)]
pub struct Options {
    pub read_only: bool,
    /// Whether fsync requests and copy-ups reach the disk.
    pub syncs: bool,
    pub ttl: Duration,
    pub xattrs: bool,
    /// Directories with lower content may be renamed (by redirect); off: EXDEV.
    pub redirect_dir: bool,
    /// Metadata-only copy-up of lower regular files (see metacopy.rs).
    pub metacopy: bool,
    /// POSIX ACLs enforced (no `noacl`); see acl.rs for when they can be.
    pub acl: bool,
    /// The mount is `noatime`: reads of layer files must not move their atime.
    pub noatime: bool,
}

/// Cache lifetime for entries and attributes. Every change to the layers goes
/// through this daemon, so the kernel's caches stay right for as long as it likes.
pub const DEFAULT_TTL: Duration = Duration::from_secs(86400);

pub struct Union {
    /// Top-down; index 0 is the upper layer when `upper` is true.
    layers: Vec<Layer>,
    upper: bool,
    /// `workdir/work`: where copy-ups and new entries are staged. Same filesystem as
    /// the upper layer, so a rename publishes a staged entry atomically.
    work: Option<Arc<OwnedFd>>,
    /// `workdir/#stratafs-index` (see [`Workdir::index`]).
    index: Option<Arc<OwnedFd>>,
    /// `workdir` itself, where the shared whiteout lives (not in `work`, which is
    /// empty whenever no step is under way).
    workdir_root: Option<OwnedFd>,
    whiteout_style: WhiteoutStyle,
    /// Where this mount writes redirect, origin and other private markers.
    xattr_ns: XattrNs,
    /// The lower hard-link groups copied up into the index.
    indexed: hardlink::IndexedGroups,
    /// Names of lower hard-link groups removed through the mount, by group.
    removed_links: removed_links::RemovedLinks,
    inodes: InodeTable,
    files: DashMap<u64, Arc<OpenFile>>,
    dirs: DashMap<u64, Arc<readdir::DirHandle>>,
    next_handle: AtomicU64,
    next_temp: AtomicU64,
    /// Whether reflinks (FICLONE) may work on the upper filesystem: cleared on the
    /// first refusal so that later copy-ups do not ask again.
    reflink: std::sync::atomic::AtomicBool,
    /// Whether char-device whiteouts may be links of the shared one (see
    /// `whiteout::SHARED_WHITEOUT`): cleared on the first refusal of the link.
    shared_whiteout: std::sync::atomic::AtomicBool,
    /// This daemon's pid, part of staged names (the process may fork before use).
    pid: u32,
    opts: Options,
    /// How owners and modes are shown and stored (mappings, squash, override xattrs).
    owner: owner::OwnerPolicy,
    /// Called with an inode whose attributes changed as a side effect (a directory
    /// becoming merged on copy-up changes its st_nlink), so that the kernel's cached
    /// copy can be dropped.
    stale_attr_hook: std::sync::OnceLock<StaleAttrHook>,
    grafts: graft::Grafts,
}

pub(crate) const UPPER: LayerIdx = 0;

/// Bound on the parent steps [`Union::describe`] takes: deeper than any path the
/// kernel can hand over (PATH_MAX is 4096 bytes, two per component at least).
const DESCRIBE_MAX_DEPTH: usize = 2048;

impl Union {
    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// Registers the function told about attributes that changed behind the
    /// kernel's back (set once, by the FUSE adapter).
    pub fn on_stale_attrs(&self, hook: StaleAttrHook) {
        let _ = self.stale_attr_hook.set(hook);
    }

    /// Tells the kernel to drop its cached attributes of `ino` (for changes made
    /// behind this daemon, such as writes through a passthrough file).
    pub fn forget_cached_attrs(&self, ino: Ino) {
        self.attrs_changed(ino);
    }

    fn attrs_changed(&self, ino: Ino) {
        if let Some(hook) = self.stale_attr_hook.get() {
            hook(ino);
        }
    }

    /// Number of inodes the kernel currently holds (for tests and diagnostics).
    pub fn inode_count(&self) -> usize {
        self.inodes.len()
    }

    /// After many inodes were forgotten: releases the inode table's spare capacity.
    pub fn shrink_inode_table(&self) {
        self.inodes.shrink();
    }

    /// The merged path of `ino`, joined with `name` when given, for log lines. Built
    /// from the names each inode was last reached by, so a rename racing it may show
    /// either name. At most [`DESCRIBE_MAX_DEPTH`] steps (a parent chain is a tree
    /// the engine keeps, but a log line must never spin); a longer or broken chain
    /// starts with `…` or `<inode N>`.
    pub fn describe(&self, ino: Ino, name: Option<&OsStr>) -> String {
        let mut parts: Vec<Box<OsStr>> = Vec::new();
        if let Some(n) = name {
            parts.push(n.into());
        }
        let mut at = ino;
        let mut head = String::new();
        for _ in 0..DESCRIBE_MAX_DEPTH {
            if at == ROOT_INO {
                break;
            }
            let Some(inode) = self.inodes.get(at) else {
                head = format!("<inode {at}>");
                break;
            };
            let st = inode.state.read();
            parts.push(Box::<OsStr>::from(st.name()));
            at = st.parent();
        }
        if at != ROOT_INO && head.is_empty() {
            head = "…".into();
        }
        let mut out = head;
        for p in parts.iter().rev() {
            out.push('/');
            out.push_str(&p.to_string_lossy());
        }
        if out.is_empty() {
            out.push('/');
        }
        out
    }

    /// `e`, naming layer `idx` as the one the entry concerned comes from.
    pub(crate) fn error_from_layer(&self, e: Error, idx: LayerIdx) -> Error {
        match self.layers.get(idx) {
            Some(layer) => e.in_layer(idx, &layer.path),
            None => e,
        }
    }

    fn inode(&self, ino: Ino) -> Result<Arc<inode::Inode>> {
        // The kernel only names inodes it holds; a miss means the table and the
        // kernel disagree, which is reported rather than trusted.
        self.inodes.get(ino).ok_or(Errno::STALE.into())
    }

    fn check_writable(&self) -> Result<()> {
        if self.opts.read_only || !self.upper {
            Err(Errno::ROFS.into())
        } else {
            Ok(())
        }
    }

    fn work_fd(&self) -> Result<&Arc<OwnedFd>> {
        self.work.as_ref().ok_or(Errno::ROFS.into())
    }

    /// A fresh name for staging an entry in the work directory.
    fn temp_name(&self) -> std::ffi::OsString {
        let n = self.next_temp.fetch_add(1, Ordering::Relaxed);
        format!("#stratafs-{}-{n:x}", self.pid).into()
    }

    fn new_handle(&self) -> u64 {
        self.next_handle.fetch_add(1, Ordering::Relaxed)
    }

    fn layer(&self, idx: LayerIdx) -> Result<&Layer> {
        self.layers.get(idx).ok_or(Errno::IO.into())
    }

    /// The lowest layer of the merged tree (graft layers come after it and only hang
    /// off their graft points).
    fn bottom_layer(&self) -> LayerIdx {
        self.grafts.base - 1
    }

    /// The st_ino a real object of layer `idx` would get.
    fn derived_ino(&self, idx: LayerIdx, real_ino: u64) -> Ino {
        let bits = self.layers.get(idx).map(|l| l.ino_bits).unwrap_or(0);
        let ino = real_ino | bits;
        if ino == ROOT_INO {
            ino | (1 << 62)
        } else {
            ino
        }
    }
}

/// Removes `name` under `dir` and everything below it without following symlinks.
/// Depth-first with an explicit stack of open directories, not by recursion: a
/// staged or left-over tree may be thousands of levels deep. Each turn removes an
/// entry or descends into one, so it ends on any finite tree.
pub(crate) fn remove_tree(dir: std::os::fd::BorrowedFd<'_>, name: &OsStr) -> sys::SysResult<()> {
    match sys::fs::unlink_at(dir, name) {
        Ok(()) => return Ok(()),
        Err(Errno::ISDIR) | Err(Errno::PERM) => {}
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e),
    }
    let mut stack: Vec<(OwnedFd, std::ffi::OsString)> =
        vec![(sys::fs::open_dir(dir, name)?, name.to_os_string())];
    while let Some((fd, _)) = stack.last() {
        let mut subdir = None;
        for entry in sys::fs::read_dir(fd.as_fd())? {
            match sys::fs::unlink_at(fd.as_fd(), &entry.name) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(Errno::ISDIR) | Err(Errno::PERM) => {
                    subdir = Some(entry.name);
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        match subdir {
            Some(sub) => {
                let sub_fd = sys::fs::open_dir(fd.as_fd(), &sub)?;
                stack.push((sub_fd, sub));
            }
            None => {
                if let Some((done, done_name)) = stack.pop() {
                    drop(done);
                    let parent = stack.last().map_or(dir, |(f, _)| f.as_fd());
                    sys::fs::rmdir_at(parent, &done_name)?;
                }
            }
        }
    }
    Ok(())
}

/// Converts a stat into the attributes of an inode numbered `ino`.
fn attr_from_stat(ino: Ino, st: &sys::fs::Stat) -> Attr {
    Attr {
        ino,
        mode: st.st_mode,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev,
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        blksize: st.st_blksize as u32,
        atime: Time {
            sec: st.st_atime,
            nsec: st.st_atime_nsec as u32,
        },
        mtime: Time {
            sec: st.st_mtime,
            nsec: st.st_mtime_nsec as u32,
        },
        ctime: Time {
            sec: st.st_ctime,
            nsec: st.st_ctime_nsec as u32,
        },
    }
}
