//! The request handlers: one small match per FUSE operation, converting between
//! the protocol's types and the engine's, for either transport (`channel.rs`:
//! fuser over /dev/fuse; `ring.rs`: FUSE over io_uring). No union logic lives here.

use std::ffi::OsStr;
use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, RenameFlags, TimeOrNow, WriteFlags,
};

use super::passthrough::{IoChoice, IoModes, OpenIo};
use super::reply::{
    AttrReply, Backing, CreateReply, DataReply, DirPlusReply, DirReply, EmptyReply, EntryReply,
    IoctlReply, LseekReply, OpenReply, StatfsReply, WriteReply, XattrReply,
};
use super::stats::RequestStats;
use super::watchdog::{Guard, Watchdog};
use crate::sys::fs::{FS_IOC_FSGETXATTR, FS_IOC_FSSETXATTR, FSXATTR_SIZE};
use crate::union::{self, Attr, Caller, RenameMode, SetAttr, SetTime, Time, Union};

pub struct StrataFs {
    engine: Arc<Union>,
    writeback: bool,
    /// How each open inode and handle does I/O (passthrough or served).
    io: IoModes<Backing>,
    /// Requests in flight, reported when one runs too long.
    watch: Watchdog,
    /// Running texts: inode -> opens made by exec (and the handles they hold), for
    /// [`StrataFs::refuses_truncating_open`].
    exec_opens: DashMap<u64, usize>,
    exec_handles: DashMap<u64, u64>,
}

/// The largest write (and read) the kernel is asked to send in one request; also
/// the payload buffer each ring entry needs (fs/fuse/dev_uring.c, fuse_uring_create:
/// the larger of max_write and max_pages pages, which fuser sets to match).
pub(super) const MAX_WRITE: usize = 1 << 20;

/// READs up to this size are read into the worker's [`READ_BUFFER`]; larger ones (only
/// O_DIRECT readers ask for them) into a buffer of their own, so that no worker keeps
/// more than this.
const READ_BUFFER_KEPT: usize = 256 << 10;

thread_local! {
    /// Each worker's buffer for READ replies, kept between requests. A buffer made per
    /// request is zeroed, and at the kernel's 128 KiB readahead size (glibc's mmap
    /// threshold) also faulted in and unmapped again each time: 14% of the daemon's
    /// CPU time in a sequential read of a lower file (perf, page faults, memset and
    /// TLB shootdowns).
    static READ_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The kernel's `__FMODE_EXEC`, which it leaves in the flags of the open an exec makes.
const OPEN_FOR_EXEC: i32 = 0o40;

impl StrataFs {
    pub fn new(
        engine: Arc<Union>,
        passthrough: bool,
        writeback: bool,
        stats: Option<Arc<RequestStats>>,
    ) -> Self {
        // On a noatime mount no read may move a layer file's atime. The daemon's
        // fds are O_NOATIME there, but the kernel gives each passthrough open a
        // backing file of its own, opened with the caller's flags on the layer's
        // mount (fs/fuse/passthrough.c, fuse_passthrough_open: backing_file_open(
        // &file->f_path, file->f_flags, ...)), whose reads and mappings then move
        // atime by that mount's rules: I/O is served by the daemon instead.
        let noatime = engine.options().noatime;
        StrataFs {
            engine,
            writeback,
            io: IoModes::new(passthrough && !writeback && !noatime),
            watch: Watchdog::from_env().with_stats(stats),
            exec_opens: DashMap::new(),
            exec_handles: DashMap::new(),
        }
    }
}

/// Requests whose name is an xattr's, not an entry's.
fn names_an_xattr(op: &str) -> bool {
    matches!(op, "getxattr" | "setxattr" | "removexattr")
}

impl StrataFs {
    /// Registers a request with the watchdog (and the accounting); at debug level,
    /// logs it with the merged path it concerns.
    fn start<'a>(&'a self, op: &'static str, ino: u64, name: Option<&'a OsStr>) -> Guard<'a> {
        let req = self.watch.start(op, ino, name);
        if log::log_enabled!(log::Level::Debug) {
            log::debug!("{op} {}", self.describe(&req));
        }
        req
    }

    /// [`StrataFs::start`] of a request from (`ino`, `name`) to (`to_ino`, `to_name`).
    fn start_to<'a>(
        &'a self,
        op: &'static str,
        ino: u64,
        name: Option<&'a OsStr>,
        to_ino: u64,
        to_name: &'a OsStr,
    ) -> Guard<'a> {
        let req = self.watch.start_to(op, ino, name, to_ino, to_name);
        if log::log_enabled!(log::Level::Debug) {
            log::debug!("{op} {}", self.describe(&req));
        }
        req
    }

    /// What a request concerns, for its log lines: `/a/b`, `/a/b -> /c`, or
    /// `/a/b xattr user.x`.
    fn describe(&self, req: &Guard<'_>) -> String {
        let entry = match names_an_xattr(req.op) {
            true => None,
            false => req.name,
        };
        let mut out = self.engine.describe(req.ino, entry);
        if let (true, Some(x)) = (names_an_xattr(req.op), req.name) {
            out.push_str(&format!(" xattr {}", x.to_string_lossy()));
        }
        if let Some((to_ino, to_name)) = req.to {
            out.push_str(" -> ");
            out.push_str(&self.engine.describe(to_ino, Some(to_name)));
        }
        out
    }

    /// The one place an engine error becomes the reply's errno. Every failed request
    /// gets a log line naming the operation, the merged path it concerns and the
    /// engine's context: at debug level for the answers clients expect (ENOENT,
    /// EEXIST...), at warn for the ones that point at a problem (EIO, ENOSPC...). The
    /// path is built only when the line is logged.
    fn fail(&self, req: &Guard<'_>, err: union::Error) -> Errno {
        let level = if err.is_expected() {
            log::Level::Debug
        } else {
            log::Level::Warn
        };
        if log::log_enabled!(level) {
            log::log!(level, "{} {}: {err}", req.op, self.describe(req));
        }
        Errno::from_i32(err.errno().raw_os_error())
    }
}

fn system_time(t: Time) -> SystemTime {
    if t.sec >= 0 {
        UNIX_EPOCH + Duration::new(t.sec as u64, t.nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.sec.unsigned_abs()) + Duration::from_nanos(t.nsec.into())
    }
}

fn engine_time(t: TimeOrNow) -> SetTime {
    match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(st) => match st.duration_since(UNIX_EPOCH) {
            Ok(d) => SetTime::At(Time {
                sec: d.as_secs() as i64,
                nsec: d.subsec_nanos(),
            }),
            Err(e) => {
                let d = e.duration();
                let (mut sec, mut nsec) = (-(d.as_secs() as i64), d.subsec_nanos());
                if nsec > 0 {
                    sec -= 1;
                    nsec = 1_000_000_000 - nsec;
                }
                SetTime::At(Time { sec, nsec })
            }
        },
    }
}

fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: system_time(a.atime),
        mtime: system_time(a.mtime),
        ctime: system_time(a.ctime),
        crtime: UNIX_EPOCH,
        kind: file_type(a.mode),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev as u32,
        blksize: if a.blksize == 0 { 4096 } else { a.blksize },
        flags: 0,
    }
}

/// A negative entry: of its attributes the kernel reads only the node id, 0.
fn negative_entry() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// What a SETATTR asks to change; `None` leaves an attribute as it is.
pub(super) struct AttrChange {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeOrNow>,
    pub mtime: Option<TimeOrNow>,
}

impl StrataFs {
    /// Chooses how an open of `handle` does its I/O and records it.
    ///
    /// Passthrough binds the kernel inode to one backing file for as long as any
    /// open of it lasts, and readers opened before a copy-up must read the copy (as
    /// on kernel overlayfs), while no open may ever be refused for the kernel's
    /// one-mode-per-inode rule. So a file whose data may still move to another real
    /// file (a lower file on a writable mount, a metadata-only copy) is served by
    /// the daemon, with the page cache doing the repeated reads; a file whose data
    /// stays where it is (an upper copy, a volume file, any file of a read-only
    /// mount) uses passthrough, with one read-write backing file shared by every
    /// open. While served opens of an inode last, later opens are served too.
    fn choose_io(
        &self,
        fh: u64,
        handle: &union::OpenFile,
        open_backing: impl FnOnce(&std::fs::File) -> io::Result<Backing>,
    ) -> IoChoice<Backing> {
        // A file of a size-limited volume counts as not passthrough-able: every write
        // to it must be seen (and charged) by the daemon.
        //
        // A set-user-ID or set-group-ID file is served too: a write by a caller
        // without CAP_FSETID must clear the bits, which only the daemon can do (see
        // `Union::kill_privs_after_change`: with FUSE_HANDLE_KILLPRIV_V2 the kernel
        // leaves it to us), and passthrough writes never reach the daemon.
        let mode = handle.mode_at_open.or_else(|| {
            let meta = handle.file.metadata().ok()?;
            Some(std::os::unix::fs::MetadataExt::mode(&meta))
        });
        let privileged = mode.is_some_and(|m| m & (libc::S_ISUID | libc::S_ISGID) != 0);
        let fixed_data = mode.is_some_and(|m| m & libc::S_IFMT == libc::S_IFREG)
            && !privileged
            && !self.engine.io_needs_daemon(handle.ino)
            && !self.engine.data_may_move(handle.ino);
        let open = OpenIo {
            fh,
            ino: handle.ino,
            writable: handle.writable,
            fixed_data,
        };
        let (choice, first_writer) = self.io.choose(&open, || {
            // Upper files get a read-write backing file so that every later open,
            // reader or writer, can share it.
            let rdwr = if handle.in_upper && !handle.plain_rdwr {
                self.engine.open_upper_rdwr(handle.ino).ok()
            } else {
                None
            };
            open_backing(rdwr.as_ref().unwrap_or(&handle.file))
        });
        if first_writer {
            // Attributes cached before this open would outlive the writes that
            // bypass the daemon (see `attr_ttl`).
            self.engine.forget_cached_attrs(handle.ino);
        }
        choice
    }

    /// How long the kernel may keep the attributes of `ino`. Writes through a
    /// passthrough file, and above all through its shared mappings, change the
    /// backing file's size and times without a request here, so while an inode has
    /// such a writer its attributes are fetched afresh on every stat.
    fn attr_ttl(&self, ino: u64) -> Duration {
        if self.io.has_passthrough_writer(ino) {
            Duration::ZERO
        } else {
            self.engine.attr_ttl(ino)
        }
    }

    fn end_io(&self, fh: u64) {
        self.io.end(fh);
    }

    /// Whether an open must fail with ETXTBSY before the engine sees it: one that
    /// truncates (FUSE_ATOMIC_O_TRUNC hands O_TRUNC to the daemon's open) while the
    /// file runs. For O_WRONLY and O_RDWR the kernel has refused already, when it
    /// took write access; for `O_RDONLY|O_TRUNC` it checks only after our open, in
    /// its own truncate step, so truncating here would empty a running binary and
    /// then answer ETXTBSY anyway.
    fn refuses_truncating_open(&self, ino: u64, flags: i32) -> bool {
        flags & libc::O_TRUNC != 0
            && flags & libc::O_ACCMODE == libc::O_RDONLY
            && self.exec_opens.get(&ino).is_some_and(|n| *n > 0)
    }

    /// After `change` by `who` to `ino`: clears the set-user-ID and set-group-ID bits
    /// the VFS would clear (`Union::kill_privs_after_change`). Returns the attributes
    /// when they changed. A failure is logged, not answered: the change itself was
    /// made.
    fn kill_privs(&self, who: Caller, ino: u64, change: union::PrivChange) -> Option<Attr> {
        self.kill_privs_known(who, ino, change, None)
    }

    /// [`StrataFs::kill_privs`] given the attributes after the change, where the
    /// handler has them.
    fn kill_privs_known(
        &self,
        who: Caller,
        ino: u64,
        change: union::PrivChange,
        after: Option<Attr>,
    ) -> Option<Attr> {
        self.engine
            .kill_privs_after_change(who, ino, change, after)
            .unwrap_or_else(|e| {
                log::warn!("clearing set-user/group-ID of inode {ino} after {change:?}: {e}");
                None
            })
    }

    fn open_flags(&self, ino: u64) -> FopenFlags {
        if self.engine.is_grafted(ino) {
            // Volumes change behind this mount (other mounts, the host): no page
            // cache that could go stale.
            return FopenFlags::FOPEN_DIRECT_IO;
        }
        if self.io.lost() {
            return FopenFlags::empty();
        }
        // All changes to layer file data pass through this kernel mount, and files
        // written through backing files are never served meanwhile (see
        // `choose_io`), so its page cache stays valid across opens.
        FopenFlags::FOPEN_KEEP_CACHE
    }
}

/// The request handlers, one per FUSE operation, shared by both transports: each
/// gets the request's decoded arguments and answers through its reply (see
/// `reply.rs`) before returning.
impl StrataFs {
    /// Asks the kernel for what the handlers rely on. `config` is fuser's view of
    /// the INIT negotiation, on whichever transport requests then come.
    pub(super) fn negotiate(&self, config: &mut KernelConfig) {
        for cap in [
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_ATOMIC_O_TRUNC,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_MAX_PAGES,
            // Shared mmap of volume files, which are opened with direct I/O.
            InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP,
            // No file handles that open_by_handle_at could use: node ids live only
            // as long as the kernel's references (the engine forgets an inode at
            // nlookup 0), and there is no lookup of "." / ".." by node id, so such
            // a handle would answer ESTALE later. name_to_handle_at answers
            // EOPNOTSUPP instead (fs/fuse/inode.c, process_init_reply: s_export_op =
            // &fuse_export_fid_operations), and AT_HANDLE_FID ids (fanotify) stay.
            InitFlags::FUSE_NO_EXPORT_SUPPORT,
            // The daemon clears set-user/group-ID itself (`kill_privs`), so the
            // kernel marks the superblock SB_NOSEC and stops asking for
            // security.capability before every write.
            InitFlags::FUSE_HANDLE_KILLPRIV_V2,
        ] {
            let _ = config.add_capabilities(cap);
        }
        if self.writeback
            && config
                .add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE)
                .is_err()
        {
            log::info!("writeback cache not offered by the kernel");
        }
        if self.io.wanted()
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok()
        {
            self.io.enable();
        }
        // The kernel checks ACLs itself (with default_permissions, which the mount
        // always has) and stops applying the umask to new entries: the engine applies
        // it, or a parent's default ACL instead (see union/acl.rs).
        if self.engine.posix_acls()
            && config
                .add_capabilities(InitFlags::FUSE_POSIX_ACL | InitFlags::FUSE_DONT_MASK)
                .is_err()
        {
            log::info!("POSIX ACLs not offered by the kernel");
        }
        let _ = config.set_max_write(MAX_WRITE as u32);
    }

    /// A name that is not there is answered as a negative entry (node id 0) that
    /// the kernel may keep as long as the parent's attributes, so that repeated
    /// probes of absent names (`git status` reading .gitignore in every directory,
    /// compilers searching include paths, `$PATH` lookups) cost no round trip: every
    /// change that can make a name appear in a layered directory arrives through
    /// this mount on that very dentry. Under a graft, which the host and other
    /// mounts change behind the kernel's back, the lifetime is zero and the answer
    /// is ENOENT, as before.
    pub(super) fn lookup(&self, parent: u64, name: &OsStr, reply: impl EntryReply) {
        let w = self.start("lookup", parent, Some(name));
        match self.engine.lookup(parent, name) {
            Ok(e) => reply.entry(&e.ttl, &file_attr(&e.attr), Generation(0)),
            Err(e) if e.errno() == union::Errno::NOENT => {
                let ttl = self.engine.attr_ttl(parent);
                // Logged as any miss, whichever way it is answered.
                let errno = self.fail(&w, e);
                if ttl.is_zero() {
                    reply.error(errno)
                } else {
                    reply.entry(&ttl, &negative_entry(), Generation(0))
                }
            }
            Err(e) => reply.error(self.fail(&w, e)),
        }
    }

    pub(super) fn forget(&self, ino: u64, nlookup: u64) {
        let _w = self.start("forget", ino, None);
        self.engine.forget(ino, nlookup);
    }

    pub(super) fn getattr(&self, ino: u64, reply: impl AttrReply) {
        let w = self.start("getattr", ino, None);
        match self.engine.getattr(ino) {
            Ok(a) => reply.attr(&self.attr_ttl(ino), &file_attr(&a)),
            Err(e) => reply.error(self.fail(&w, e)),
        }
    }

    pub(super) fn setattr(
        &self,
        who: Caller,
        ino: u64,
        change: &AttrChange,
        fh: Option<u64>,
        reply: impl AttrReply,
    ) {
        let w = self.start("setattr", ino, None);
        let set = SetAttr {
            mode: change.mode,
            uid: change.uid,
            gid: change.gid,
            size: change.size,
            atime: change.atime.map(engine_time),
            mtime: change.mtime.map(engine_time),
        };
        let owner_change = change.uid.is_some() || change.gid.is_some();
        let group_before = if owner_change {
            self.engine.getattr(ino).ok().map(|a| a.gid)
        } else {
            None
        };
        match self.engine.setattr(ino, &set, fh) {
            Ok(a) => {
                let privs = if owner_change {
                    Some(union::PrivChange::Owner { group_before })
                } else {
                    change
                        .size
                        .map(|_| union::PrivChange::Data { may_fsetid: None })
                };
                let a = match privs {
                    Some(c) => self.kill_privs_known(who, ino, c, Some(a)).unwrap_or(a),
                    None => a,
                };
                reply.attr(&self.attr_ttl(ino), &file_attr(&a))
            }
            Err(e) => reply.error(self.fail(&w, e)),
        }
    }

    pub(super) fn readlink(&self, ino: u64, reply: impl DataReply) {
        let w = self.start("readlink", ino, None);
        match self.engine.readlink(ino) {
            Ok(t) => reply.data(t.as_encoded_bytes()),
            Err(e) => reply.error(self.fail(&w, e)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn mknod(
        &self,
        who: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: impl EntryReply,
    ) {
        let w = self.start("mknod", parent, Some(name));
        let mode = self.engine.creation_mode(parent, mode, umask);
        match self.engine.mknod(who, parent, name, mode, rdev.into()) {
            Ok(e) => reply.entry(&e.ttl, &file_attr(&e.attr), Generation(0)),
            Err(e) => reply.error(self.fail(&w, e)),
        }
    }

    pub(super) fn mkdir(
        &self,
        who: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: impl EntryReply,
    ) {
        let w = self.start("mkdir", parent, Some(name));
        let mode = self.engine.creation_mode(parent, mode, umask);
        match self.engine.mkdir(who, parent, name, mode) {
            Ok(e) => reply.entry(&e.ttl, &file_attr(&e.attr), Generation(0)),
            Err(e) => reply.error(self.fail(&w, e)),
        }
    }

    pub(super) fn unlink(&self, parent: u64, name: &OsStr, reply: impl EmptyReply) {
        let w = self.start("unlink", parent, Some(name));
        match self.engine.unlink(parent, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail(&w, e)),
        }
    }

    pub(super) fn rmdir(&self, parent: u64, name: &OsStr, reply: impl EmptyReply) {
        let w = self.start("rmdir", parent, Some(name));
        match self.engine.rmdir(parent, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail(&w, e)),
        }
    }

    pub(super) fn symlink(
        &self,
        who: Caller,
        parent: u64,
        link_name: &OsStr,
        target: &OsStr,
        reply: impl EntryReply,
    ) {
        let w = self.start("symlink", parent, Some(link_name));
        match self.engine.symlink(who, parent, link_name, target) {
            Ok(e) => reply.entry(&e.ttl, &file_attr(&e.attr), Generation(0)),
            Err(e) => reply.error(self.fail(&w, e)),
        }
    }

    pub(super) fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: RenameFlags,
        reply: impl EmptyReply,
    ) {
        let w = self.start_to("rename", parent, Some(name), newparent, newname);
        let mode = if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            RenameMode::Exchange
        } else if flags.contains(RenameFlags::RENAME_NOREPLACE) {
            RenameMode::NoReplace
        } else if flags.is_empty() {
            RenameMode::Replace
        } else {
            return reply.error(Errno::EINVAL);
        };
        match self.engine.rename(parent, name, newparent, newname, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail(&w, e)),
        }
    }

    pub(super) fn link(&self, ino: u64, newparent: u64, newname: &OsStr, reply: impl EntryReply) {
        let w = self.start_to("link", ino, None, newparent, newname);
        match self.engine.link(ino, newparent, newname) {
            Ok(e) => reply.entry(&e.ttl, &file_attr(&e.attr), Generation(0)),
            Err(e) => reply.error(self.fail(&w, e)),
        }
    }

    pub(super) fn open(&self, who: Caller, ino: u64, flags: i32, reply: impl OpenReply) {
        let w = self.start("open", ino, None);
        if self.refuses_truncating_open(ino, flags) {
            return reply.error(self.fail(&w, union::Errno::TXTBSY.into()));
        }
        let (fh, handle) = match self.engine.open(ino, flags) {
            Ok(h) => h,
            Err(e) => return reply.error(self.fail(&w, e)),
        };
        if flags & OPEN_FOR_EXEC != 0 {
            *self.exec_opens.entry(ino).or_insert(0) += 1;
            self.exec_handles.insert(fh, ino);
        }
        // Truncated by the open itself (FUSE_ATOMIC_O_TRUNC).
        if flags & libc::O_TRUNC != 0 {
            self.kill_privs(who, ino, union::PrivChange::Data { may_fsetid: None });
        }
        match self.choose_io(fh, &handle, |f| reply.open_backing(f)) {
            IoChoice::Passthrough(b) => {
                reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &b)
            }
            IoChoice::Served => reply.opened(FileHandle(fh), self.open_flags(ino)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn create(
        &self,
        who: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: impl CreateReply,
    ) {
        let w = self.start("create", parent, Some(name));
        let mode = self.engine.creation_mode(parent, mode, umask);
        let (entry, fh, handle) = match self.engine.create(who, parent, name, mode, flags) {
            Ok(c) => c,
            Err(e) => return reply.error(self.fail(&w, e)),
        };
        let attr = file_attr(&entry.attr);
        match self.choose_io(fh, &handle, |f| reply.open_backing(f)) {
            IoChoice::Passthrough(b) => reply.created_passthrough(
                &entry.ttl,
                &attr,
                Generation(0),
                FileHandle(fh),
                FopenFlags::empty(),
                &b,
            ),
            IoChoice::Served => reply.created(
                &entry.ttl,
                &attr,
                Generation(0),
                FileHandle(fh),
                self.open_flags(entry.attr.ino),
            ),
        }
    }

    pub(super) fn read(&self, ino: u64, fh: u64, offset: u64, size: u32, reply: impl DataReply) {
        let w = self.start("read", ino, None);
        let size = size as usize;
        READ_BUFFER.with(|cell| {
            // Busy only if a read were served inside a read on this thread, which
            // never happens; a fresh buffer would do then too.
            let mut kept = cell
                .try_borrow_mut()
                .ok()
                .filter(|_| size <= READ_BUFFER_KEPT);
            let mut fresh = Vec::new();
            let buf = kept.as_deref_mut().unwrap_or(&mut fresh);
            if buf.len() < size {
                buf.resize(size, 0);
            }
            match self.engine.read_into(fh, offset, &mut buf[..size]) {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => reply.error(self.fail(&w, e)),
            }
        });
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn write(
        &self,
        who: Caller,
        ino: u64,
        fh: u64,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        reply: impl WriteReply,
    ) {
        let w = self.start("write", ino, None);
        match self.engine.write(fh, offset, data) {
            Ok(n) => {
                // The kernel sets the flag exactly when the writer lacks CAP_FSETID;
                // without it there is nothing to clear, and no stat to pay per write.
                if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
                    let change = union::PrivChange::Data {
                        may_fsetid: Some(false),
                    };
                    self.kill_privs(who, ino, change);
                }
                reply.written(n as u32)
            }
            Err(e) => reply.error(self.fail(&w, e)),
        }
    }

    /// Answered ENOSYS, after which the kernel sends no FLUSH on this connection
    /// again (`fc->no_flush`) and a close costs no round trip: a close has nothing
    /// to hand the daemon. Writes served by the daemon reach the layer file at each
    /// WRITE, passthrough writes never come here, and POSIX locks are the kernel's
    /// own (there are no lock handlers), so no lock owner needs releasing. The
    /// kernel still writes back dirty pages at close and reports their errors
    /// before the point where it would have sent the request (fuse_flush).
    pub(super) fn flush(&self, ino: u64, reply: impl EmptyReply) {
        let _w = self.start("flush", ino, None);
        reply.error(Errno::ENOSYS);
    }

    pub(super) fn release(&self, ino: u64, fh: u64, reply: impl EmptyReply) {
        let _w = self.start("release", ino, None);
        if let Some((_, ino)) = self.exec_handles.remove(&fh) {
            self.exec_opens.remove_if_mut(&ino, |_, n| {
                *n -= 1;
                *n == 0
            });
        }
        self.end_io(fh);
        self.engine.release(fh);
        reply.ok();
    }

    pub(super) fn fsync(&self, ino: u64, fh: u64, datasync: bool, reply: impl EmptyReply) {
        let w = self.start("fsync", ino, None);
        match self.engine.fsync(fh, datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail(&w, e)),
        }
    }

    pub(super) fn opendir(&self, ino: u64, reply: impl OpenReply) {
        let w = self.start("opendir", ino, None);
        match self.engine.opendir(ino) {
            // Every change to a layered directory's listing arrives as a request on
            // it, which makes the kernel drop its cached copy: the listing may be
            // cached and kept across opens. Grafted directories change behind the
            // kernel's back (the host, other mounts) and are listed afresh.
            Ok(fh) if self.engine.is_grafted(ino) => {
                reply.opened(FileHandle(fh), FopenFlags::empty())
            }
            Ok(fh) => reply.opened(
                FileHandle(fh),
                FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Err(e) => reply.error(self.fail(&w, e)),
        }
    }

    pub(super) fn readdir(&self, ino: u64, fh: u64, offset: u64, mut reply: impl DirReply) {
        let w = self.start("readdir", ino, None);
        let done = self.engine.readdir_into(fh, offset, |e| {
            reply.add(INodeNo(e.ino), e.next_offset, file_type(e.kind), &e.name)
        });
        match done {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail(&w, e)),
        }
    }

    pub(super) fn readdirplus(&self, ino: u64, fh: u64, offset: u64, mut reply: impl DirPlusReply) {
        let w = self.start("readdirplus", ino, None);
        let done = self
            .engine
            .readdirplus_into(ino, fh, offset, |e, attr, ttl| {
                reply.add(
                    e.next_offset,
                    &e.name,
                    &ttl,
                    &file_attr(attr),
                    Generation(0),
                )
            });
        match done {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail(&w, e)),
        }
    }

    pub(super) fn releasedir(&self, ino: u64, fh: u64, reply: impl EmptyReply) {
        let _w = self.start("releasedir", ino, None);
        self.engine.releasedir(fh);
        reply.ok();
    }

    pub(super) fn fsyncdir(&self, ino: u64, reply: impl EmptyReply) {
        let _w = self.start("fsyncdir", ino, None);
        reply.ok();
    }

    pub(super) fn statfs(&self, ino: u64, reply: impl StatfsReply) {
        let w = self.start("statfs", ino, None);
        match self.engine.statfs_at(ino) {
            Ok(s) => reply.statfs(&s),
            Err(e) => reply.error(self.fail(&w, e)),
        }
    }

    pub(super) fn setxattr(
        &self,
        who: Caller,
        ino: u64,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        reply: impl EmptyReply,
    ) {
        let w = self.start("setxattr", ino, Some(name));
        match self.engine.setxattr(ino, name, value, flags) {
            Ok(()) => {
                // The kernel's FUSE_SETXATTR_ACL_KILL_SGID needs FUSE_SETXATTR_EXT,
                // whose request layout fuser 0.18 does not parse.
                if self.engine.is_access_acl(name) {
                    self.kill_privs(who, ino, union::PrivChange::AccessAcl);
                }
                reply.ok()
            }
            Err(e) => reply.error(self.fail(&w, e)),
        }
    }

    pub(super) fn getxattr(&self, ino: u64, name: &OsStr, size: u32, reply: impl XattrReply) {
        let w = self.start("getxattr", ino, Some(name));
        match self.engine.getxattr(ino, name) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() <= size as usize => reply.value(&v),
            Ok(_) => reply.error(Errno::ERANGE),
            Err(e) => reply.error(self.fail(&w, e)),
        }
    }

    pub(super) fn listxattr(&self, ino: u64, size: u32, reply: impl XattrReply) {
        let w = self.start("listxattr", ino, None);
        match self.engine.listxattr(ino) {
            Ok(names) => {
                let mut buf = Vec::new();
                for n in names {
                    buf.extend_from_slice(n.as_encoded_bytes());
                    buf.push(0);
                }
                if size == 0 {
                    reply.size(buf.len() as u32)
                } else if buf.len() <= size as usize {
                    reply.value(&buf)
                } else {
                    reply.error(Errno::ERANGE)
                }
            }
            Err(e) => reply.error(self.fail(&w, e)),
        }
    }

    pub(super) fn removexattr(&self, ino: u64, name: &OsStr, reply: impl EmptyReply) {
        let w = self.start("removexattr", ino, Some(name));
        match self.engine.removexattr(ino, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail(&w, e)),
        }
    }

    pub(super) fn access(&self, ino: u64, reply: impl EmptyReply) {
        let w = self.start("access", ino, None);
        // The mount always uses default_permissions, so the kernel checks access
        // itself; this only answers whether the inode still exists.
        match self.engine.getattr(ino) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(self.fail(&w, e)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn fallocate(
        &self,
        who: Caller,
        ino: u64,
        fh: u64,
        offset: u64,
        length: u64,
        mode: i32,
        reply: impl EmptyReply,
    ) {
        let w = self.start("fallocate", ino, None);
        match self.engine.fallocate(fh, offset, length, mode) {
            Ok(()) => {
                self.kill_privs(who, ino, union::PrivChange::Data { may_fsetid: None });
                reply.ok()
            }
            Err(e) => reply.error(self.fail(&w, e)),
        }
    }

    /// The kernel's FUSE client sends its fileattr_get/fileattr_set (chattr, lsattr,
    /// xfs_io) as these four ioctls on a file or directory it opened itself, after
    /// checking the caller (owner, CAP_LINUX_IMMUTABLE); any other ioctl is refused.
    pub(super) fn ioctl(&self, ino: u64, cmd: u32, in_data: &[u8], reply: impl IoctlReply) {
        let w = self.start("ioctl", ino, None);
        let fsx = |d: &[u8]| {
            <[u8; FSXATTR_SIZE]>::try_from(d).map_err(|_| union::Error::from(union::Errno::INVAL))
        };
        let done = match cmd {
            c if c == libc::FS_IOC_GETFLAGS as u32 => self
                .engine
                .inode_flags(ino)
                .map(|f| f.to_ne_bytes().to_vec()),
            c if c == libc::FS_IOC_SETFLAGS as u32 => in_data
                .get(..4)
                .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or(union::Errno::INVAL.into())
                .and_then(|f| self.engine.set_inode_flags(ino, f))
                .map(|()| Vec::new()),
            FS_IOC_FSGETXATTR => self.engine.fs_xattr(ino).map(|x| x.to_vec()),
            FS_IOC_FSSETXATTR => fsx(in_data)
                .and_then(|x| self.engine.set_fs_xattr(ino, &x))
                .map(|()| Vec::new()),
            _ => Err(union::Errno::NOTTY.into()),
        };
        match done {
            Ok(out) => reply.ioctl(0, &out),
            Err(e) => reply.error(self.fail(&w, e)),
        }
    }

    pub(super) fn lseek(
        &self,
        ino: u64,
        fh: u64,
        offset: i64,
        whence: i32,
        reply: impl LseekReply,
    ) {
        let w = self.start("lseek", ino, None);
        match self.engine.lseek(fh, offset, whence) {
            Ok(pos) => reply.offset(pos as i64),
            Err(e) => reply.error(self.fail(&w, e)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn copy_file_range(
        &self,
        who: Caller,
        ino_in: u64,
        fh_in: u64,
        offset_in: u64,
        ino_out: u64,
        fh_out: u64,
        offset_out: u64,
        len: u64,
        reply: impl WriteReply,
    ) {
        let w = self.start("copy_file_range", ino_in, None);
        match self
            .engine
            .copy_file_range(fh_in, offset_in, fh_out, offset_out, len)
        {
            Ok(n) => {
                self.kill_privs(who, ino_out, union::PrivChange::Data { may_fsetid: None });
                reply.written(n as u32)
            }
            Err(e) => reply.error(self.fail(&w, e)),
        }
    }
}
