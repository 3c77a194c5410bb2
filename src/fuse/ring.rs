//! The FUSE-over-io_uring transport (`-o io_uring=1`). Linux 6.14+ can carry
//! requests over one io_uring queue per CPU: the kernel writes a request into a
//! registered buffer and completes a command; the daemon writes the reply in place
//! and, in one submission, commits it and asks for the next request. That saves
//! the read and the write on /dev/fuse per request and keeps a request on the CPU
//! that made it.
//!
//! Our own layer, because fuser 0.18 only negotiates the flag: its requests and
//! replies can be made only from its own /dev/fuse channel. So this module decodes
//! the ring's requests (`wire.rs`), calls the same handlers as the /dev/fuse
//! transport (`adapter.rs`) and answers through the reply traits (`reply.rs`).
//!
//! Negotiated at INIT (`offer`), only when every queue's io_uring could be made
//! first: once the INIT reply names the flag, the kernel holds every request until
//! the ring is registered, so a transport that cannot start must not be asked for.
//! If a registration fails later, the kernel itself turns the ring off for the
//! connection and goes on over /dev/fuse. FORGET and INTERRUPT always come over
//! /dev/fuse, where fuser's loop keeps serving them.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, SessionACL,
};

use super::adapter::{AttrChange, MAX_WRITE, StrataFs};
use super::reply::{
    AttrReply, Backing, CreateReply, DataReply, DirPlusReply, DirReply, EmptyReply, EntryReply,
    Fails, IoctlReply, LseekReply, MakesBacking, OpenReply, StatfsReply, WriteReply, XattrReply,
};
use super::wire::{self, InHeader, Op, ReplyWriter};
use crate::sys::fuse_dev::RingBacking;
use crate::sys::fuse_ring::{self, FuseQueue};
use crate::sys::process;
use crate::union::{Caller, StatFs};

/// Entries each queue thread registers. One: a thread serves one request at a
/// time, and the kernel keeps the rest queued until the commit that fetches the
/// next; each entry holds a payload buffer of the largest request.
const ENTRIES_PER_THREAD: usize = 1;

/// What the transport needs before INIT: the /dev/fuse connection, how many
/// threads may serve, and whose requests the session serves.
pub(super) struct RingPlan {
    dev: OwnedFd,
    threads: usize,
    callers: Callers,
}

impl RingPlan {
    pub(super) fn new(dev: impl AsFd, threads: usize, acl: SessionACL) -> io::Result<RingPlan> {
        Ok(RingPlan {
            dev: dev.as_fd().try_clone_to_owned()?,
            threads,
            callers: Callers {
                acl,
                owner: process::ids().0,
            },
        })
    }
}

/// The session's filter on callers, as fuser applies it on /dev/fuse: without
/// `allow_other` (fusermount's auto_unmount sets it on the kernel mount anyway)
/// only the owner, and with `allow_root` root too, may make requests, except the
/// ones the kernel sends on behalf of an open file or without a caller.
#[derive(Clone, Copy)]
struct Callers {
    acl: SessionACL,
    owner: u32,
}

impl Callers {
    fn refuses(&self, uid: u32, op: &Op<'_>) -> bool {
        let allowed = match self.acl {
            SessionACL::All => true,
            SessionACL::RootAndOwner => uid == self.owner || uid == 0,
            SessionACL::Owner => uid == self.owner,
        };
        !allowed
            && !matches!(
                op,
                Op::Destroy
                    | Op::Read { .. }
                    | Op::Readdir { .. }
                    | Op::Readdirplus { .. }
                    | Op::Forget { .. }
                    | Op::Write { .. }
                    | Op::Fsync { .. }
                    | Op::Fsyncdir { .. }
                    | Op::Release { .. }
                    | Op::Releasedir { .. }
            )
    }
}

/// At INIT, after the handlers' own negotiation: makes the queues and asks for the
/// ring, or says why requests stay on /dev/fuse. Each queue is made by the thread
/// that will serve it (an io_uring's completions run in its submitter's context),
/// and the ring is asked for only once every thread has its queue; the threads
/// then register, once the kernel has the INIT reply (`FuseQueue::register` waits).
pub(super) fn offer(plan: RingPlan, fs: &Arc<StrataFs>, config: &mut KernelConfig) {
    if !config
        .capabilities()
        .contains(InitFlags::FUSE_OVER_IO_URING)
    {
        log::info!(
            "io_uring: the kernel does not offer FUSE over io_uring (module parameter \
             fuse.enable_uring is off); requests come over /dev/fuse"
        );
        return;
    }
    let queues = match queue_ids(plan.threads) {
        Ok(q) => q,
        Err(e) => {
            log::warn!("io_uring: {e}; requests come over /dev/fuse");
            return;
        }
    };
    let dev = Arc::new(plan.dev);
    let (made, made_rx) = mpsc::channel::<io::Result<()>>();
    let mut starts = Vec::with_capacity(queues.len());
    for (i, qid) in queues.iter().copied().enumerate() {
        let (start, start_rx) = mpsc::channel::<bool>();
        let (fs, dev, callers) = (fs.clone(), dev.clone(), plan.callers);
        let queue_made = made.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("ring-{i}"))
            .spawn(move || {
                // Not pinned to its queue's CPU (libfuse pins): on two CPUs a pinned
                // thread competes with the requester it serves, and untar took 1.2x
                // the /dev/fuse time pinned, 1.05x unpinned (scripts/bench --quick).
                let queue = match FuseQueue::new(dev.as_fd(), qid, ENTRIES_PER_THREAD, MAX_WRITE) {
                    Ok(q) => q,
                    Err(e) => return drop(queue_made.send(Err(e))),
                };
                let _ = queue_made.send(Ok(()));
                if start_rx.recv() == Ok(true) {
                    serve(queue, &fs, callers);
                }
            });
        match spawned {
            Ok(_) => starts.push(start),
            Err(e) => {
                let _ = made.send(Err(e));
            }
        }
    }
    drop(made);
    let failed = (0..queues.len())
        .filter_map(|_| match made_rx.recv() {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some(io::Error::other("a queue thread ended")),
        })
        .next();
    let go = failed.is_none()
        && config
            .add_capabilities(InitFlags::FUSE_OVER_IO_URING)
            .is_ok();
    for start in starts {
        let _ = start.send(go);
    }
    match failed {
        Some(e) => {
            log::warn!("io_uring: cannot set up the queues ({e}); requests come over /dev/fuse")
        }
        None if go => log::info!("requests over io_uring: {} queue threads", queues.len()),
        None => {}
    }
}

/// The queue of each thread: one queue per possible CPU (the kernel's queue index
/// is the requester's CPU), and as many threads on each as the thread budget
/// allows, at least one.
fn queue_ids(threads: usize) -> io::Result<Vec<u16>> {
    let cpus = fuse_ring::possible_cpus()?;
    let per_queue = (threads / cpus).max(1);
    let last = u16::try_from(cpus - 1).map_err(|_| io::Error::other("too many CPUs"))?;
    Ok((0..=last)
        .flat_map(|qid| std::iter::repeat_n(qid, per_queue))
        .collect())
}

/// A queue thread: serves requests until the connection ends.
fn serve(mut queue: FuseQueue, fs: &StrataFs, callers: Callers) {
    let dev = queue.device().clone();
    if let Err(e) = queue.register() {
        log::error!("io_uring: registering a queue: {e}");
        return;
    }
    // The request is copied out of the entry before the handler runs: its reply is
    // written into the same payload buffer.
    let mut op_in = Vec::new();
    let mut payload = Vec::new();
    loop {
        let mut req = match queue.next_request() {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                log::error!("io_uring: waiting for a request: {e}");
                return;
            }
        };
        let header = InHeader::parse(req.in_header());
        op_in.clear();
        op_in.extend_from_slice(req.op_in());
        payload.clear();
        payload.extend_from_slice(req.payload());
        let (out_header, out_payload) = req.reply_buffers();
        let mut answer = Answer::default();
        let unique = match header {
            Some(h) => {
                let reply = RingReply {
                    out: ReplyWriter::new(out_payload),
                    answer: &mut answer,
                    dev: &dev,
                };
                dispatch(fs, callers, &h, &op_in, &payload, reply);
                h.unique
            }
            None => {
                answer.error = -libc::EIO;
                0
            }
        };
        if !wire::out_header(out_header, unique, answer.error, answer.len) {
            // The header area is the kernel's fixed 128 bytes: cannot happen.
            log::error!("io_uring: no room for a reply header");
        }
        if let Err(e) = req.commit(answer.len) {
            log::error!("io_uring: sending a reply: {e}");
            return;
        }
    }
}

/// How a request was answered: 0 or a negative errno, and the payload length.
struct Answer {
    error: i32,
    len: usize,
}

impl Default for Answer {
    /// A handler that returns without answering has failed (as fuser answers a
    /// dropped reply).
    fn default() -> Self {
        Answer {
            error: -libc::EIO,
            len: 0,
        }
    }
}

/// The reply to one ring request, written into its entry's payload buffer.
struct RingReply<'a> {
    out: ReplyWriter<'a>,
    answer: &'a mut Answer,
    dev: &'a Arc<OwnedFd>,
}

impl RingReply<'_> {
    fn done(self) {
        *self.answer = Answer {
            error: 0,
            len: self.out.len(),
        };
    }

    /// An answer too large for the buffer the kernel gave (it sized the buffer for
    /// the largest it accepts, so this means a reply it would refuse).
    fn done_if(self, fitted: bool) {
        if fitted {
            self.done()
        } else {
            self.error(Errno::ERANGE)
        }
    }

    fn backing_id(&self, backing: &Backing) -> Option<i32> {
        match backing {
            Backing::Ring(b) => i32::try_from(b.id()).ok(),
            Backing::Channel(_) => None,
        }
    }
}

impl Fails for RingReply<'_> {
    fn error(self, err: Errno) {
        *self.answer = Answer {
            error: -i32::from(err),
            len: 0,
        };
    }
}

impl EmptyReply for RingReply<'_> {
    fn ok(self) {
        self.done()
    }
}

impl EntryReply for RingReply<'_> {
    fn entry(mut self, ttl: &Duration, attr: &FileAttr, generation: Generation) {
        let fitted = self.out.entry(attr, *ttl, generation.0);
        self.done_if(fitted)
    }
}

impl AttrReply for RingReply<'_> {
    fn attr(mut self, ttl: &Duration, attr: &FileAttr) {
        let fitted = self.out.attr(attr, *ttl);
        self.done_if(fitted)
    }
}

impl DataReply for RingReply<'_> {
    fn data(mut self, data: &[u8]) {
        let fitted = self.out.data(data);
        self.done_if(fitted)
    }
}

impl MakesBacking for RingReply<'_> {
    fn open_backing(&self, file: &File) -> io::Result<Backing> {
        RingBacking::open(self.dev, file.as_fd()).map(Backing::Ring)
    }
}

impl OpenReply for RingReply<'_> {
    fn opened(mut self, fh: FileHandle, flags: FopenFlags) {
        let fitted = self.out.open(fh.0, flags.bits(), 0);
        self.done_if(fitted)
    }

    fn opened_passthrough(mut self, fh: FileHandle, flags: FopenFlags, backing: &Backing) {
        let Some(id) = self.backing_id(backing) else {
            return self.error(Errno::EIO);
        };
        let flags = flags | FopenFlags::FOPEN_PASSTHROUGH;
        let fitted = self.out.open(fh.0, flags.bits(), id);
        self.done_if(fitted)
    }
}

impl CreateReply for RingReply<'_> {
    fn created(
        mut self,
        ttl: &Duration,
        attr: &FileAttr,
        generation: Generation,
        fh: FileHandle,
        flags: FopenFlags,
    ) {
        let fitted = self
            .out
            .create(attr, *ttl, generation.0, fh.0, flags.bits(), 0);
        self.done_if(fitted)
    }

    fn created_passthrough(
        mut self,
        ttl: &Duration,
        attr: &FileAttr,
        generation: Generation,
        fh: FileHandle,
        flags: FopenFlags,
        backing: &Backing,
    ) {
        let Some(id) = self.backing_id(backing) else {
            return self.error(Errno::EIO);
        };
        let flags = flags | FopenFlags::FOPEN_PASSTHROUGH;
        let fitted = self
            .out
            .create(attr, *ttl, generation.0, fh.0, flags.bits(), id);
        self.done_if(fitted)
    }
}

impl WriteReply for RingReply<'_> {
    fn written(mut self, size: u32) {
        let fitted = self.out.write(size);
        self.done_if(fitted)
    }
}

impl StatfsReply for RingReply<'_> {
    fn statfs(mut self, s: &StatFs) {
        let fitted = self.out.statfs(s);
        self.done_if(fitted)
    }
}

impl XattrReply for RingReply<'_> {
    fn size(mut self, size: u32) {
        let fitted = self.out.xattr_size(size);
        self.done_if(fitted)
    }

    fn value(mut self, data: &[u8]) {
        let fitted = self.out.data(data);
        self.done_if(fitted)
    }
}

impl IoctlReply for RingReply<'_> {
    fn ioctl(mut self, result: i32, data: &[u8]) {
        let fitted = self.out.ioctl(result, data);
        self.done_if(fitted)
    }
}

impl LseekReply for RingReply<'_> {
    fn offset(mut self, offset: i64) {
        let fitted = self.out.lseek(offset);
        self.done_if(fitted)
    }
}

/// A listing reply, filled up to the size the request asked for.
struct RingDirReply<'a> {
    reply: RingReply<'a>,
    max: usize,
}

impl Fails for RingDirReply<'_> {
    fn error(self, err: Errno) {
        self.reply.error(err)
    }
}

impl DirReply for RingDirReply<'_> {
    fn add(&mut self, ino: INodeNo, offset: u64, kind: FileType, name: &OsStr) -> bool {
        !self.reply.out.dirent(self.max, ino.0, offset, kind, name)
    }

    fn ok(self) {
        self.reply.done()
    }
}

impl DirPlusReply for RingDirReply<'_> {
    fn add(
        &mut self,
        offset: u64,
        name: &OsStr,
        ttl: &Duration,
        attr: &FileAttr,
        generation: Generation,
    ) -> bool {
        !self
            .reply
            .out
            .direntplus(self.max, attr, *ttl, generation.0, offset, name)
    }

    fn ok(self) {
        self.reply.done()
    }
}

/// Decodes one request and hands it to its handler.
fn dispatch(
    fs: &StrataFs,
    callers: Callers,
    h: &InHeader,
    op_in: &[u8],
    payload: &[u8],
    reply: RingReply<'_>,
) {
    let op = match wire::decode(h, op_in, payload) {
        Ok(op) => op,
        Err(e) => return reply.error(e),
    };
    if callers.refuses(h.uid, &op) {
        return reply.error(Errno::EACCES);
    }
    let who = Caller {
        uid: h.uid,
        gid: h.gid,
        pid: h.pid,
    };
    let ino = h.nodeid;
    let dir = |reply, size: u32| RingDirReply {
        reply,
        max: size as usize,
    };
    match op {
        Op::Lookup { name } => fs.lookup(ino, name, reply),
        // Forgets come over /dev/fuse; one here would need no answer, but the
        // entry must still be committed to be fetched again.
        Op::Forget { nlookup } => {
            fs.forget(ino, nlookup);
            reply.done()
        }
        Op::Getattr { .. } => fs.getattr(ino, reply),
        Op::Setattr {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
            ctime: _,
            fh,
        } => {
            let change = AttrChange {
                mode,
                uid,
                gid,
                size,
                atime,
                mtime,
            };
            fs.setattr(who, ino, &change, fh.map(|f| f.0), reply)
        }
        Op::Readlink => fs.readlink(ino, reply),
        Op::Symlink { link_name, target } => {
            fs.symlink(who, ino, link_name, target.as_os_str(), reply)
        }
        Op::Mknod {
            name,
            mode,
            umask,
            rdev,
        } => fs.mknod(who, ino, name, mode, umask, rdev, reply),
        Op::Mkdir { name, mode, umask } => fs.mkdir(who, ino, name, mode, umask, reply),
        Op::Unlink { name } => fs.unlink(ino, name, reply),
        Op::Rmdir { name } => fs.rmdir(ino, name, reply),
        Op::Rename {
            name,
            newparent,
            newname,
            flags,
        } => fs.rename(ino, name, newparent.0, newname, flags, reply),
        Op::Link {
            ino: target,
            newname,
        } => fs.link(target.0, ino, newname, reply),
        Op::Open { flags } => fs.open(who, ino, flags.0, reply),
        Op::Read {
            fh, offset, size, ..
        } => fs.read(ino, fh.0, offset, size, reply),
        Op::Write {
            fh,
            offset,
            data,
            write_flags,
            ..
        } => fs.write(who, ino, fh.0, offset, data, write_flags, reply),
        Op::Statfs => fs.statfs(ino, reply),
        Op::Release { fh, .. } => fs.release(ino, fh.0, reply),
        Op::Fsync { fh, datasync } => fs.fsync(ino, fh.0, datasync, reply),
        Op::Setxattr { name, value, flags } => fs.setxattr(who, ino, name, value, flags, reply),
        Op::Getxattr { name, size } => fs.getxattr(ino, name, size, reply),
        Op::Listxattr { size } => fs.listxattr(ino, size, reply),
        Op::Removexattr { name } => fs.removexattr(ino, name, reply),
        Op::Flush { .. } => fs.flush(ino, reply),
        Op::Opendir { .. } => fs.opendir(ino, reply),
        Op::Readdir { fh, offset, size } => fs.readdir(ino, fh.0, offset, dir(reply, size)),
        Op::Releasedir { fh, .. } => fs.releasedir(ino, fh.0, reply),
        Op::Fsyncdir { .. } => fs.fsyncdir(ino, reply),
        Op::Access { .. } => fs.access(ino, reply),
        Op::Create {
            name,
            mode,
            umask,
            flags,
        } => fs.create(who, ino, name, mode, umask, flags, reply),
        // The session's end is fuser's to handle (it calls `destroy` once its
        // /dev/fuse loop ends); over the ring it is only acknowledged.
        Op::Destroy => reply.done(),
        Op::Ioctl { cmd, in_data, .. } => fs.ioctl(ino, cmd, in_data, reply),
        Op::Fallocate {
            fh,
            offset,
            length,
            mode,
        } => fs.fallocate(who, ino, fh.0, offset, length, mode, reply),
        Op::Readdirplus { fh, offset, size } => fs.readdirplus(ino, fh.0, offset, dir(reply, size)),
        Op::Lseek { fh, offset, whence } => fs.lseek(ino, fh.0, offset, whence, reply),
        Op::CopyFileRange {
            fh_in,
            offset_in,
            ino_out,
            fh_out,
            offset_out,
            len,
            ..
        } => fs.copy_file_range(
            who, ino, fh_in.0, offset_in, ino_out.0, fh_out.0, offset_out, len, reply,
        ),
        Op::Unknown(_) => reply.error(Errno::ENOSYS),
    }
}
