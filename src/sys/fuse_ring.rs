//! The kernel side of FUSE-over-io_uring (Linux 6.14+, `fuse.enable_uring`): one
//! request queue per possible CPU, each an io_uring of its own owned by one thread.
//! Request decoding and the daemon glue live elsewhere; this module only moves
//! buffers between the kernel and its caller.
//!
//! How the kernel uses the ring (fs/fuse/dev_uring.c):
//! - Each queue entry is two buffers handed over once by a REGISTER command: a header
//!   (`struct fuse_uring_req_header`: 128 bytes for fuse_in_header / fuse_out_header,
//!   128 for the op's first argument, 32 of `fuse_uring_ent_in_out`) and a payload of
//!   at least the connection's max payload (max(max_write, max_pages * page size)).
//!   The kernel keeps their *addresses*, not pinned pages, and writes into them
//!   whenever it hands the entry a request.
//! - A command stays in flight while the entry waits for a request; its completion
//!   (res 0) means the entry now holds one. The answer goes back with
//!   COMMIT_AND_FETCH, which also puts the entry back in wait, in one submission.
//! - Requests are queued on `qid` = the CPU the requesting task runs on, and the
//!   kernel sends nothing over the ring until every queue has an entry: until then
//!   requests wait (those of a connection that negotiated FUSE_OVER_IO_URING).
//! - The copy of a request into an entry runs as task work of the thread that
//!   submitted the entry's command; that is why a queue is used by one thread, and
//!   why [`FuseQueue`] is not `Send`: built on its thread, it stays there.
//! - Any command before the INIT reply has been processed gets EAGAIN. A REGISTER the
//!   kernel refuses for any other reason makes it fall back to /dev/fuse reads for the
//!   whole connection.
//! - At unmount or abort, the kernel completes every waiting command with ENOTCONN
//!   (ECANCELED if the ring itself is going away); the queue is then over.
//!
//! Memory invariant: an entry's buffers are only ever read or written here while the
//! entry is in userspace's hands, i.e. between the completion that delivered a request
//! and the COMMIT_AND_FETCH that gives it back. [`RingRequest`] is that window: it
//! mutably borrows its queue and is consumed by `commit`, so no slice of an entry can
//! outlive it. The buffers live in one mapping that never moves and is unmapped only
//! when no entry is in the kernel's hands (see `Drop for FuseQueue`).

// The daemon glue that serves requests through this module lands separately.
#![cfg_attr(not(test), allow(dead_code))]

use std::collections::VecDeque;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::uring::{Cqe, Mapping, Ring, Sqe128};

/// `FUSE_URING_IN_OUT_HEADER_SZ`: the fuse_in_header / fuse_out_header area.
pub const IN_OUT_SIZE: usize = 128;
/// `FUSE_URING_OP_IN_OUT_SZ`: the area for the op's first argument.
pub const OP_IN_SIZE: usize = 128;
/// `sizeof(struct fuse_uring_req_header)`.
pub const REQ_HEADER_SIZE: usize = IN_OUT_SIZE + OP_IN_SIZE + size_of::<EntInOut>();
/// `sizeof(struct fuse_in_header)`.
pub const IN_HEADER_SIZE: usize = 40;
/// `sizeof(struct fuse_out_header)`.
pub const OUT_HEADER_SIZE: usize = 16;

/// `enum fuse_uring_cmd`. 0 is reserved as invalid: the kernel answers it with EINVAL
/// after its connection checks, and with EAGAIN before INIT, never registering
/// anything; [`FuseQueue::register`] uses it to learn when INIT is done.
const CMD_INVALID: u32 = 0;
const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;

/// How long [`FuseQueue::register`] waits for the INIT reply, and its step.
const REGISTER_WAIT: Duration = Duration::from_secs(10);
const REGISTER_STEP: Duration = Duration::from_micros(100);
/// How long the end of a queue waits for the kernel to give back entries still in
/// its hands (it completes them all at unmount; this only bounds a kernel that does
/// not).
const DRAIN_WAIT: Duration = Duration::from_secs(2);

/// `user_data` of the INIT probe; entries use their index.
const PROBE: u64 = u64::MAX;

/// `struct fuse_uring_ent_in_out`, the last 32 bytes of an entry's header.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct EntInOut {
    flags: u64,
    /// The request's `unique`, to be sent back in the commit.
    commit_id: u64,
    /// Bytes of payload used, by the request and then by the reply.
    payload_sz: u32,
    /// Named `offset` by newer kernels; sent back as zero.
    padding: u32,
    reserved: u64,
}

/// `struct fuse_uring_req_header`.
#[repr(C)]
struct ReqHeader {
    in_out: [u8; IN_OUT_SIZE],
    op_in: [u8; OP_IN_SIZE],
    ent_in_out: EntInOut,
}

/// `struct fuse_uring_cmd_req` as placed in the SQE's 80-byte command area: flags
/// (0), commit_id, qid; the rest stays zero, as newer kernels require.
fn cmd_req(commit_id: u64, qid: u16) -> [u8; 80] {
    let mut cmd = [0u8; 80];
    cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    cmd[16..18].copy_from_slice(&qid.to_ne_bytes());
    cmd
}

/// Header slots are 512 bytes apart (a header is 288), keeping each one 64-aligned.
const HEADER_STRIDE: usize = 512;
const _: () = assert!(REQ_HEADER_SIZE <= HEADER_STRIDE && HEADER_STRIDE % 64 == 0);

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

fn page_size() -> usize {
    rustix::param::page_size()
}

/// Where an entry is. Only `Kernel` entries may be written by the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    /// Never handed over (before `register`).
    Idle,
    /// A command (REGISTER or COMMIT_AND_FETCH) is in flight or queued for submission.
    Kernel { register: bool },
    /// Holds a request; the kernel waits for its commit.
    User { commit_id: u64 },
    /// Given back with an error, or left unanswered once the connection ended: the
    /// kernel no longer writes it.
    Gone,
}

/// One FUSE request queue on its own io_uring. Owned and used by one thread (not
/// `Send`: the kernel copies requests into entries from the task work of the thread
/// that submitted them).
pub struct FuseQueue {
    /// Dropped by Drop only, which closes the ring before deciding about `buffers`.
    ring: ManuallyDrop<Ring>,
    /// Headers (`depth` × HEADER_STRIDE), then the REGISTER iovecs (`depth` × 2),
    /// then the payloads (`depth` × `payload_stride`). Freed by Drop only, after the
    /// ring, and never while the kernel holds an entry.
    buffers: ManuallyDrop<Mapping>,
    dev: Arc<OwnedFd>,
    qid: u16,
    payload_size: usize,
    payload_stride: usize,
    payload_offset: usize,
    iovec_offset: usize,
    entries: Vec<Entry>,
    /// Requests that arrived while `register` was reaping completions.
    ready: VecDeque<usize>,
    /// When EAGAIN answers to REGISTER stop being retried.
    register_deadline: Option<Instant>,
    /// The kernel said the connection is gone.
    ended: bool,
}

impl FuseQueue {
    /// Creates the io_uring and `depth` entries (header + `payload_size` payload each).
    /// `dev` is the /dev/fuse fd (duplicated here). Does not talk to the FUSE
    /// connection yet.
    pub fn new(
        dev: BorrowedFd<'_>,
        qid: u16,
        depth: usize,
        payload_size: usize,
    ) -> io::Result<FuseQueue> {
        let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
        if depth == 0 || depth > 4096 {
            return Err(invalid(format!("queue depth {depth} outside 1..=4096")));
        }
        if payload_size == 0 {
            return Err(invalid("payload size 0".into()));
        }
        let st = rustix::fs::fstat(dev)?;
        let is_fuse_dev = st.st_mode & libc::S_IFMT == libc::S_IFCHR
            && rustix::fs::major(st.st_rdev) == 10
            && rustix::fs::minor(st.st_rdev) == 229;
        if !is_fuse_dev {
            return Err(invalid(
                "FUSE ring: the fd is not the FUSE device (/dev/fuse, character device 10:229)"
                    .into(),
            ));
        }
        let queues = possible_cpus()?;
        if usize::from(qid) >= queues {
            return Err(invalid(format!(
                "FUSE ring: queue id {qid} is not below the {queues} possible CPUs"
            )));
        }
        let page = page_size();
        let iovec_offset = depth * HEADER_STRIDE;
        let payload_offset = round_up(iovec_offset + depth * 2 * size_of::<libc::iovec>(), page);
        let payload_stride = round_up(payload_size, page);
        let buffers = Mapping::anonymous(payload_offset + depth * payload_stride)?;
        // One SQE slot per entry (each has at most one command in flight) and one
        // for the INIT probe.
        let ring = Ring::new(depth as u32 + 1)?;
        let dev = Arc::new(rustix::io::fcntl_dupfd_cloexec(dev, 0)?);
        let queue = FuseQueue {
            ring: ManuallyDrop::new(ring),
            buffers: ManuallyDrop::new(buffers),
            dev,
            qid,
            payload_size,
            payload_stride,
            payload_offset,
            iovec_offset,
            entries: vec![Entry::Idle; depth],
            ready: VecDeque::new(),
            register_deadline: None,
            ended: false,
        };
        for idx in 0..depth {
            let iov = [
                libc::iovec {
                    iov_base: queue.header(idx).cast(),
                    iov_len: REQ_HEADER_SIZE,
                },
                libc::iovec {
                    iov_base: queue.payload_ptr(idx).cast(),
                    iov_len: payload_size,
                },
            ];
            // SAFETY: the iovec pair of entry idx lies inside `buffers` (laid out
            // above), suitably aligned (offsets are multiples of 16), and nothing
            // else refers to it yet.
            unsafe { queue.iovecs(idx).write(iov) };
        }
        Ok(queue)
    }

    pub fn qid(&self) -> u16 {
        self.qid
    }

    pub fn depth(&self) -> usize {
        self.entries.len()
    }

    pub fn payload_size(&self) -> usize {
        self.payload_size
    }

    /// The duplicated /dev/fuse fd, e.g. for [`super::fuse_dev::RingBacking`].
    pub fn device(&self) -> &Arc<OwnedFd> {
        &self.dev
    }

    fn base(&self) -> *mut u8 {
        self.buffers.base()
    }

    fn header(&self, idx: usize) -> *mut ReqHeader {
        debug_assert!(idx < self.entries.len());
        // SAFETY: idx < depth, so the slot lies inside the mapping.
        unsafe { self.base().add(idx * HEADER_STRIDE).cast() }
    }

    fn iovecs(&self, idx: usize) -> *mut [libc::iovec; 2] {
        debug_assert!(idx < self.entries.len());
        // SAFETY: as above, the iovec area holds depth pairs.
        unsafe {
            self.base()
                .add(self.iovec_offset)
                .cast::<[libc::iovec; 2]>()
                .add(idx)
        }
    }

    fn payload_ptr(&self, idx: usize) -> *mut u8 {
        debug_assert!(idx < self.entries.len());
        // SAFETY: as above, depth payload slots of payload_stride >= payload_size.
        unsafe {
            self.base()
                .add(self.payload_offset + idx * self.payload_stride)
        }
    }

    fn ring(&mut self) -> &mut Ring {
        &mut self.ring
    }

    fn command(&self, cmd_op: u32, user_data: u64, commit_id: u64) -> Sqe128 {
        let mut sqe = Sqe128::uring_cmd(self.dev.as_fd(), cmd_op, user_data);
        sqe.cmd = cmd_req(commit_id, self.qid);
        sqe
    }

    fn push_register(&mut self, idx: usize) -> io::Result<()> {
        let mut sqe = self.command(CMD_REGISTER, idx as u64, 0);
        sqe.addr = self.iovecs(idx) as u64;
        sqe.len = 2;
        self.ring().push(&sqe)?;
        self.entries[idx] = Entry::Kernel { register: true };
        Ok(())
    }

    /// Registers every entry. Waits (up to 10 s, in 1 ms steps) while the kernel
    /// answers EAGAIN, i.e. until the INIT reply has been processed; any other refusal
    /// is an error. A REGISTER the kernel refuses also makes it serve the connection
    /// over /dev/fuse reads from then on.
    pub fn register(&mut self) -> io::Result<()> {
        self.register_within(REGISTER_WAIT)
    }

    fn register_within(&mut self, wait: Duration) -> io::Result<()> {
        if self.entries.iter().any(|e| *e != Entry::Idle) {
            return Err(io::Error::other(format!(
                "FUSE ring queue {} is already registered",
                self.qid
            )));
        }
        let deadline = Instant::now() + wait;
        // A REGISTER refused with EAGAIN is retried by io_uring on a worker thread
        // and may then succeed or not, later, with no completion in the success case:
        // its fate could not be told from here. The probe registers nothing and
        // always completes, so it is what waits for INIT.
        loop {
            let probe = self.command(CMD_INVALID, PROBE, 0);
            self.ring().push(&probe)?;
            let cqe = loop {
                self.ring().enter(true, None)?;
                if let Some(cqe) = self.ring().pop() {
                    break cqe;
                }
            };
            debug_assert_eq!(cqe.user_data, PROBE);
            match -cqe.res {
                libc::EINVAL => break,
                libc::EAGAIN if Instant::now() < deadline => std::thread::sleep(REGISTER_STEP),
                libc::EAGAIN => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "FUSE ring queue {}: the connection's INIT was not answered \
                             within {wait:?}",
                            self.qid
                        ),
                    ));
                }
                errno => return Err(self.refused("probe", errno)),
            }
        }
        self.register_deadline = Some(deadline);
        for idx in 0..self.entries.len() {
            self.push_register(idx)?;
        }
        // Past INIT, the kernel handles a REGISTER inline: a refusal is in the CQ when
        // io_uring_enter returns, an accepted entry has no completion until a request.
        self.ring().enter(false, None)?;
        let mut first_error = None;
        while let Some(cqe) = self.ring().pop() {
            match self.on_completion(cqe) {
                Ok(Some(idx)) => self.ready.push_back(idx),
                Ok(None) if self.ended => {
                    first_error.get_or_insert_with(|| self.refused("REGISTER", libc::ENOTCONN));
                }
                Ok(None) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Handles one completion. `Ok(Some(idx))`: entry idx holds a request.
    fn on_completion(&mut self, cqe: Cqe) -> io::Result<Option<usize>> {
        if cqe.user_data == PROBE {
            return Ok(None);
        }
        let idx = cqe.user_data as usize;
        let register = match self.entries.get(idx) {
            Some(Entry::Kernel { register }) => *register,
            other => {
                return Err(io::Error::other(format!(
                    "FUSE ring queue {}: completion for entry {idx} in state {other:?}",
                    self.qid
                )));
            }
        };
        if cqe.res == 0 {
            // SAFETY: the completion ended the kernel's hold on this entry; the
            // header it wrote is ours to read (ordered by the CQ tail's Acquire).
            let ent = unsafe { (&raw const (*self.header(idx)).ent_in_out).read() };
            if ent.commit_id == 0 || ent.payload_sz as usize > self.payload_size {
                self.entries[idx] = Entry::Gone;
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "FUSE ring queue {}: entry {idx} came back with commit id {} and \
                         payload size {}",
                        self.qid, ent.commit_id, ent.payload_sz
                    ),
                ));
            }
            self.entries[idx] = Entry::User {
                commit_id: ent.commit_id,
            };
            return Ok(Some(idx));
        }
        let errno = -cqe.res;
        if matches!(errno, libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED) {
            self.entries[idx] = Entry::Gone;
            self.ended = true;
            return Ok(None);
        }
        let retry = errno == libc::EAGAIN
            && register
            && self.register_deadline.is_some_and(|d| Instant::now() < d);
        if retry {
            std::thread::sleep(REGISTER_STEP);
            self.push_register(idx)?;
            self.ring().enter(false, None)?;
            return Ok(None);
        }
        self.entries[idx] = Entry::Gone;
        Err(self.refused(
            if register {
                "REGISTER"
            } else {
                "COMMIT_AND_FETCH"
            },
            errno,
        ))
    }

    fn refused(&self, what: &str, errno: i32) -> io::Error {
        let hint = match errno {
            libc::EOPNOTSUPP => {
                "fuse.enable_uring is off (/sys/module/fuse/parameters/enable_uring) and the \
                 connection did not negotiate FUSE_OVER_IO_URING, or the kernel lacks \
                 CONFIG_FUSE_IO_URING"
            }
            // 6.18 answers EPERM for a device not (yet) attached to a connection.
            libc::EPERM | libc::ENOTCONN => {
                "the FUSE device is not mounted, or its connection is gone"
            }
            libc::ECONNABORTED => "the FUSE connection was aborted",
            libc::EINVAL => {
                "the kernel refused the entry: a payload buffer smaller than the \
                 connection's max payload (max(max_write, max_pages * page size)), or a \
                 queue id it does not have"
            }
            libc::ENOENT => "the kernel has no request with that commit id on this queue",
            _ => "",
        };
        let os = io::Error::from_raw_os_error(errno);
        io::Error::new(
            os.kind(),
            format!("FUSE ring queue {}: {what}: {os}; {hint}", self.qid),
        )
    }

    /// Waits for the next request; `Ok(None)` once the connection is gone.
    pub fn next_request(&mut self) -> io::Result<Option<RingRequest<'_>>> {
        loop {
            if self.ended {
                self.drain();
                return Ok(None);
            }
            if let Some(idx) = self.ready.pop_front() {
                // Only entries that received a request are made ready.
                let Entry::User { commit_id } = self.entries[idx] else {
                    continue;
                };
                return Ok(Some(RingRequest {
                    queue: self,
                    idx,
                    commit_id,
                    committed: false,
                }));
            }
            if !self
                .entries
                .iter()
                .any(|e| matches!(e, Entry::Kernel { .. }))
            {
                return Err(io::Error::other(format!(
                    "FUSE ring queue {}: no entry is registered with the kernel",
                    self.qid
                )));
            }
            match self.ring().pop() {
                Some(cqe) => {
                    if let Some(idx) = self.on_completion(cqe)? {
                        self.ready.push_back(idx);
                    }
                }
                None => self.ring().enter(true, None)?,
            }
        }
    }

    /// After the end, takes back what the kernel still holds, so that Drop can free
    /// the buffers. Requests that still arrive are left unanswered: the kernel has
    /// already failed them.
    fn drain(&mut self) {
        for idx in self.ready.drain(..) {
            self.entries[idx] = Entry::Gone;
        }
        let deadline = Instant::now() + DRAIN_WAIT;
        while self
            .entries
            .iter()
            .any(|e| matches!(e, Entry::Kernel { .. }))
        {
            let now = Instant::now();
            if now >= deadline {
                log::debug!("FUSE ring queue {}: entries still in the kernel", self.qid);
                return;
            }
            match self.ring().pop() {
                Some(cqe) => match self.on_completion(cqe) {
                    Ok(Some(idx)) => self.entries[idx] = Entry::Gone,
                    Ok(None) => {}
                    Err(e) => log::debug!("{e}"),
                },
                None => {
                    if let Err(e) = self.ring().enter(true, Some(deadline - now)) {
                        log::debug!("FUSE ring queue {}: {e}", self.qid);
                        return;
                    }
                }
            }
        }
    }

    /// Sends entry idx's reply and asks for its next request.
    fn commit(&mut self, idx: usize, commit_id: u64, payload_len: usize) -> io::Result<()> {
        debug_assert!(payload_len <= self.payload_size);
        // SAFETY: the entry is in userspace's hands until the submission below.
        unsafe {
            let ent = &raw mut (*self.header(idx)).ent_in_out;
            (&raw mut (*ent).payload_sz).write(payload_len as u32);
            (&raw mut (*ent).padding).write(0);
        }
        let sqe = self.command(CMD_COMMIT_AND_FETCH, idx as u64, commit_id);
        self.ring().push(&sqe)?;
        // From the push on, the entry is the kernel's: it reads the reply when the
        // command is submitted and may write the next request at once.
        self.entries[idx] = Entry::Kernel { register: false };
        // With one entry nothing else of this queue can complete before the commit
        // is submitted, so it goes with the next wait (`next_request` submits before
        // it sleeps): one syscall per round trip. With more, another entry's request
        // may be served first, and this reply must not wait for it.
        if self.entries.len() > 1 {
            self.ring().enter(false, None)?;
        }
        Ok(())
    }
}

impl Drop for FuseQueue {
    fn drop(&mut self) {
        // A commit still unsubmitted (see `commit`) is a reply the kernel waits for.
        let _ = self.ring.enter(false, None);
        let held = self
            .entries
            .iter()
            .any(|e| matches!(e, Entry::Kernel { .. }));
        // Closing the ring makes the kernel cancel the commands it holds, but
        // asynchronously, and not at all while a forked child still has the ring fd:
        // a request could still be copied into an entry afterwards. Freed memory must
        // never be written by the kernel, so buffers of held entries are leaked.
        // SAFETY: neither field is used after this, and each is dropped once.
        unsafe { ManuallyDrop::drop(&mut self.ring) };
        if held {
            log::debug!(
                "FUSE ring queue {}: entries still registered, their buffers are leaked",
                self.qid
            );
        } else {
            // SAFETY: as above; no entry is the kernel's and its ring is closed.
            unsafe { ManuallyDrop::drop(&mut self.buffers) };
        }
    }
}

// FuseQueue must stay !Send (see its doc). This fails to compile if it became Send:
// the item below would then be ambiguous between the two impls.
trait AmbiguousIfSend<A> {
    fn check() {}
}
impl<T: ?Sized> AmbiguousIfSend<()> for T {}
impl<T: ?Sized + Send> AmbiguousIfSend<u8> for T {}
const _: fn() = || <FuseQueue as AmbiguousIfSend<_>>::check();

/// A request in one entry: the entry belongs to userspace until `commit` (or Drop,
/// which answers EIO so that the kernel is never left waiting).
pub struct RingRequest<'q> {
    queue: &'q mut FuseQueue,
    idx: usize,
    commit_id: u64,
    committed: bool,
}

impl RingRequest<'_> {
    fn header(&self) -> *mut ReqHeader {
        self.queue.header(self.idx)
    }

    /// The 40-byte fuse_in_header.
    pub fn in_header(&self) -> &[u8] {
        // SAFETY: the entry is in userspace's hands while self lives (module doc).
        unsafe { &(&(*self.header()).in_out)[..IN_HEADER_SIZE] }
    }

    /// The 128-byte area holding the op's first argument (its size depends on the op).
    pub fn op_in(&self) -> &[u8] {
        // SAFETY: as above.
        unsafe { &(*self.header()).op_in }
    }

    /// The request's payload: its remaining arguments.
    pub fn payload(&self) -> &[u8] {
        // SAFETY: as above; payload_sz was checked against payload_size when the
        // request arrived, and the entry's payload slot has payload_size bytes.
        unsafe {
            let len = (&raw const (*self.header()).ent_in_out.payload_sz).read() as usize;
            std::slice::from_raw_parts(self.queue.payload_ptr(self.idx), len)
        }
    }

    /// The `unique` of the request (its commit id).
    pub fn unique(&self) -> u64 {
        self.commit_id
    }

    /// The reply buffers: the 16-byte fuse_out_header area (it overlays the in
    /// header) and the whole payload buffer.
    pub fn reply_buffers(&mut self) -> (&mut [u8], &mut [u8]) {
        // SAFETY: as above; the two slices are disjoint (header and payload slots).
        unsafe {
            let out = &mut (&mut (*self.header()).in_out)[..OUT_HEADER_SIZE];
            let payload = std::slice::from_raw_parts_mut(
                self.queue.payload_ptr(self.idx),
                self.queue.payload_size,
            );
            (out, payload)
        }
    }

    /// Sends the reply (the out header as written, `payload_len` bytes of payload) and
    /// asks for the next request, in one submission. A `payload_len` beyond the
    /// payload buffer sends EIO instead and is an error.
    pub fn commit(mut self, payload_len: usize) -> io::Result<()> {
        self.committed = true;
        if payload_len > self.queue.payload_size {
            self.reply_error_in_place(libc::EIO);
            self.queue.commit(self.idx, self.commit_id, 0)?;
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "FUSE ring reply of {payload_len} bytes exceeds the {}-byte payload buffer",
                    self.queue.payload_size
                ),
            ));
        }
        self.queue.commit(self.idx, self.commit_id, payload_len)
    }

    fn reply_error_in_place(&mut self, errno: i32) {
        let unique = self.unique();
        let (out, _) = self.reply_buffers();
        out[0..4].copy_from_slice(&(OUT_HEADER_SIZE as u32).to_ne_bytes());
        out[4..8].copy_from_slice(&(-errno).to_ne_bytes());
        out[8..16].copy_from_slice(&unique.to_ne_bytes());
    }
}

impl Drop for RingRequest<'_> {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        self.reply_error_in_place(libc::EIO);
        if let Err(e) = self.queue.commit(self.idx, self.commit_id, 0) {
            log::debug!("FUSE ring: EIO reply to a dropped request: {e}");
        }
    }
}

/// The kernel's count of possible CPUs (`num_possible_cpus()`), which is its number
/// of ring queues.
pub fn possible_cpus() -> io::Result<usize> {
    const POSSIBLE: &str = "/sys/devices/system/cpu/possible";
    let text = std::fs::read_to_string(POSSIBLE)?;
    parse_cpu_list(text.trim()).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{POSSIBLE}: not a CPU list: {text:?}"),
        )
    })
}

/// Counts the CPUs of a kernel CPU list (`0-3,5,8-9`). A weight, not the highest id +
/// 1: the kernel sizes its queue array by the weight of the possible mask.
fn parse_cpu_list(list: &str) -> Option<usize> {
    let mut count = 0usize;
    for part in list.split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (lo.parse::<usize>().ok()?, hi.parse::<usize>().ok()?),
            None => {
                let n = part.parse::<usize>().ok()?;
                (n, n)
            }
        };
        count += hi.checked_sub(lo)? + 1;
    }
    (count > 0).then_some(count)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::mem::offset_of;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;

    /// True when a FUSE connection can be mounted here (/dev/fuse, root). Panics when
    /// it cannot, unless STRATAFS_SKIP_FUSE_TESTS is set (then prints "skipped:").
    pub(in crate::sys) fn fuse_available() -> bool {
        let mut missing = Vec::new();
        if !Path::new("/dev/fuse").exists() {
            missing.push("/dev/fuse is missing");
        }
        if !crate::sys::process::is_root() {
            missing.push("the tests do not run as root");
        }
        if missing.is_empty() {
            return true;
        }
        if std::env::var_os("STRATAFS_SKIP_FUSE_TESTS").is_some() {
            eprintln!("skipped: {}", missing.join(", "));
            return false;
        }
        panic!(
            "this test needs FUSE (/dev/fuse, root), but {}; set STRATAFS_SKIP_FUSE_TESTS=1 \
             to skip it explicitly",
            missing.join(", ")
        );
    }

    #[test]
    fn header_layout_is_the_kernels() {
        assert_eq!(size_of::<EntInOut>(), 32);
        assert_eq!(offset_of!(EntInOut, commit_id), 8);
        assert_eq!(offset_of!(EntInOut, payload_sz), 16);
        assert_eq!(offset_of!(EntInOut, padding), 20);
        assert_eq!(offset_of!(EntInOut, reserved), 24);
        assert_eq!(size_of::<ReqHeader>(), 128 + 128 + 32);
        assert_eq!(REQ_HEADER_SIZE, size_of::<ReqHeader>());
        assert_eq!(offset_of!(ReqHeader, op_in), 128);
        assert_eq!(offset_of!(ReqHeader, ent_in_out), 256);
        // struct fuse_uring_cmd_req { u64 flags; u64 commit_id; u16 qid; u8 pad[6]; }
        #[repr(C)]
        struct CmdReq {
            flags: u64,
            commit_id: u64,
            qid: u16,
            padding: [u8; 6],
        }
        assert_eq!(size_of::<CmdReq>(), 24);
        assert_eq!(offset_of!(CmdReq, commit_id), 8);
        assert_eq!(offset_of!(CmdReq, qid), 16);
        let cmd = cmd_req(0x0102_0304_0506_0708, 0x0a0b);
        assert_eq!(cmd[..8], [0; 8]);
        assert_eq!(cmd[8..16], 0x0102_0304_0506_0708u64.to_ne_bytes());
        assert_eq!(cmd[16..18], 0x0a0bu16.to_ne_bytes());
        assert!(cmd[18..].iter().all(|b| *b == 0));
    }

    #[test]
    fn cpu_lists_are_counted_by_weight() {
        assert_eq!(parse_cpu_list("0"), Some(1));
        assert_eq!(parse_cpu_list("0-1"), Some(2));
        assert_eq!(parse_cpu_list("0-3,5,8-9"), Some(7));
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("0-x"), None);
    }

    #[test]
    fn possible_cpus_covers_the_usable_ones() {
        let possible = possible_cpus().unwrap();
        let usable = std::thread::available_parallelism().unwrap().get();
        assert!(possible >= usable, "{possible} possible < {usable} usable");
    }

    #[test]
    fn new_refuses_a_fd_that_is_not_the_fuse_device() {
        let null = std::fs::File::open("/dev/null").unwrap();
        let err = FuseQueue::new(null.as_fd(), 0, 1, 1 << 17)
            .err()
            .expect("/dev/null is not /dev/fuse");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("/dev/fuse"), "{err}");
    }

    #[test]
    fn new_refuses_bad_sizes_and_queue_ids() {
        if !fuse_available() {
            return;
        }
        let dev = crate::sys::mount::open_fuse_device().unwrap();
        let beyond = u16::try_from(possible_cpus().unwrap()).unwrap();
        for (qid, depth, payload) in [(beyond, 1, 1 << 17), (0, 0, 1 << 17), (0, 1, 0)] {
            let err = FuseQueue::new(dev.as_fd(), qid, depth, payload)
                .err()
                .expect("refused");
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
        }
    }

    #[test]
    fn a_queue_is_built_without_a_connection_and_register_fails_at_once() {
        if !fuse_available() {
            return;
        }
        let dev = crate::sys::mount::open_fuse_device().unwrap();
        let mut queue = FuseQueue::new(dev.as_fd(), 0, 4, 1 << 17).unwrap();
        assert_eq!(
            (queue.qid(), queue.depth(), queue.payload_size()),
            (0, 4, 1 << 17)
        );
        let start = Instant::now();
        let err = queue.register().unwrap_err();
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
        // EPERM on 6.18 (the device has no connection), ENOTCONN on older kernels.
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::PermissionDenied | io::ErrorKind::NotConnected
            ),
            "{err}"
        );
        assert!(err.to_string().contains("not mounted"), "{err}");
        let same_device = |fd: BorrowedFd<'_>| rustix::fs::fstat(fd).unwrap().st_rdev;
        assert_eq!(
            same_device(queue.device().as_fd()),
            same_device(dev.as_fd())
        );
        // Nothing was handed to the kernel: the queue ends at once.
        assert!(queue.next_request().is_err());
    }

    // ---- end to end: a hand-made FUSE connection served over the ring ----

    const FUSE_LOOKUP: u32 = 1;
    const FUSE_GETATTR: u32 = 3;
    const FUSE_INIT: u32 = 26;
    const FUSE_MAX_PAGES: u64 = 1 << 22;
    const FUSE_INIT_EXT: u64 = 1 << 30;
    const FUSE_PASSTHROUGH: u64 = 1 << 37;
    const FUSE_OVER_IO_URING: u64 = 1 << 41;
    const MAX_WRITE: usize = 128 << 10;
    const ROOT_MODE: u32 = libc::S_IFDIR | 0o755;
    const ROOT_NLINK: u32 = 7;
    const ROOT_MTIME: u64 = 1_700_000_000;
    const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes(b[at..at + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_ne_bytes(b[at..at + 8].try_into().unwrap())
    }
    fn put(b: &mut [u8], at: usize, v: &[u8]) {
        b[at..at + v.len()].copy_from_slice(v);
    }

    /// Sets fuse.enable_uring to Y, and back to what it was on drop. The tests that
    /// set it take turns, so that none restores it under another.
    struct UringEnabled(
        String,
        #[allow(dead_code)] std::sync::MutexGuard<'static, ()>,
    );
    impl UringEnabled {
        fn set() -> UringEnabled {
            static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
            let turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
            let previous = std::fs::read_to_string(ENABLE_URING)
                .unwrap_or_else(|e| panic!("{ENABLE_URING}: {e} (kernel without FUSE io_uring?)"));
            std::fs::write(ENABLE_URING, "Y").unwrap();
            UringEnabled(previous.trim().to_string(), turn)
        }
    }
    impl Drop for UringEnabled {
        fn drop(&mut self) {
            if let Err(e) = std::fs::write(ENABLE_URING, &self.0) {
                eprintln!("restoring {ENABLE_URING} to {}: {e}", self.0);
            }
        }
    }

    /// Unmounts (MNT_DETACH) on drop unless already done.
    struct Mounted(Option<PathBuf>);
    impl Mounted {
        fn unmount(&mut self) {
            if let Some(p) = self.0.take() {
                crate::sys::mount::unmount(&p, true).expect("umount2(MNT_DETACH)");
            }
        }
    }
    impl Drop for Mounted {
        fn drop(&mut self) {
            if let Some(p) = self.0.take() {
                let _ = crate::sys::mount::unmount(&p, true);
            }
        }
    }

    /// Reads the INIT request from /dev/fuse and answers it: io_uring, max_write 128
    /// KiB, passthrough when offered. Returns the flags granted.
    fn answer_init(dev: &OwnedFd) -> u64 {
        use rustix::event::{PollFd, PollFlags, poll};
        let mut fds = [PollFd::new(dev, PollFlags::IN)];
        let ten_s = rustix::fs::Timespec {
            tv_sec: 10,
            tv_nsec: 0,
        };
        assert_eq!(
            poll(&mut fds, Some(&ten_s)).unwrap(),
            1,
            "no INIT within 10 s"
        );
        let mut buf = vec![0u8; MAX_WRITE + 4096];
        let n = rustix::io::read(dev, &mut buf).unwrap();
        assert!(n >= 40 + 16, "short INIT: {n} bytes");
        assert_eq!(u32_at(&buf, 4), FUSE_INIT);
        let unique = u64_at(&buf, 8);
        // fuse_init_in after the 40-byte header: major, minor, max_readahead, flags,
        // flags2.
        let max_readahead = u32_at(&buf, 48);
        let mut offered = u64::from(u32_at(&buf, 52));
        if offered & FUSE_INIT_EXT != 0 {
            offered |= u64::from(u32_at(&buf, 56)) << 32;
        }
        assert_ne!(
            offered & FUSE_OVER_IO_URING,
            0,
            "the kernel does not offer FUSE_OVER_IO_URING although enable_uring is Y"
        );
        let granted =
            (FUSE_INIT_EXT | FUSE_MAX_PAGES | FUSE_OVER_IO_URING | FUSE_PASSTHROUGH) & offered;
        let mut reply = [0u8; 16 + 64];
        let len = reply.len() as u32;
        put(&mut reply, 0, &len.to_ne_bytes());
        put(&mut reply, 8, &unique.to_ne_bytes());
        let out = &mut reply[16..];
        put(out, 0, &7u32.to_ne_bytes());
        put(out, 4, &40u32.to_ne_bytes());
        put(out, 8, &max_readahead.to_ne_bytes());
        put(out, 12, &(granted as u32).to_ne_bytes());
        put(out, 16, &16u16.to_ne_bytes()); // max_background
        put(out, 18, &12u16.to_ne_bytes()); // congestion_threshold
        put(out, 20, &(MAX_WRITE as u32).to_ne_bytes());
        put(out, 24, &1u32.to_ne_bytes()); // time_gran
        put(out, 28, &((MAX_WRITE / 4096) as u16).to_ne_bytes()); // max_pages
        put(out, 32, &((granted >> 32) as u32).to_ne_bytes()); // flags2
        if granted & FUSE_PASSTHROUGH != 0 {
            put(out, 36, &2u32.to_ne_bytes()); // max_stack_depth
        }
        assert_eq!(rustix::io::write(dev, &reply).unwrap(), reply.len());
        granted
    }

    /// What the queues served.
    #[derive(Default)]
    struct Served {
        root_getattrs: AtomicUsize,
        lookups_of_missing: AtomicUsize,
    }

    /// Answers GETATTR of the root with a directory, leaves LOOKUP of "missing"
    /// unanswered (the dropped request answers EIO), anything else ENOSYS.
    fn serve(queue: &mut FuseQueue, served: &Served) -> io::Result<()> {
        while let Some(mut req) = queue.next_request()? {
            let header = req.in_header();
            let (opcode, nodeid) = (u32_at(header, 4), u64_at(header, 16));
            let unique = u64_at(header, 8);
            assert_eq!(unique, req.unique());
            // LOOKUP's first argument is empty: its name is all the payload.
            if opcode == FUSE_LOOKUP && req.payload() == b"missing\0" {
                served.lookups_of_missing.fetch_add(1, Ordering::SeqCst);
                drop(req);
                continue;
            }
            let root_getattr = opcode == FUSE_GETATTR && nodeid == 1;
            if root_getattr {
                // Its one argument, fuse_getattr_in, is in op_in; no payload.
                assert_eq!(req.op_in().len(), OP_IN_SIZE);
                assert!(req.payload().is_empty(), "{} bytes", req.payload().len());
            }
            let (out, payload) = req.reply_buffers();
            put(out, 8, &unique.to_ne_bytes());
            if root_getattr {
                // fuse_attr_out: attr_valid, attr_valid_nsec, dummy, then fuse_attr.
                payload[..104].fill(0);
                let attr = &mut payload[16..104];
                put(attr, 0, &1u64.to_ne_bytes()); // ino
                put(attr, 8, &4096u64.to_ne_bytes()); // size
                put(attr, 32, &ROOT_MTIME.to_ne_bytes()); // mtime
                put(attr, 60, &ROOT_MODE.to_ne_bytes());
                put(attr, 64, &ROOT_NLINK.to_ne_bytes());
                put(attr, 80, &4096u32.to_ne_bytes()); // blksize
                put(out, 0, &(16u32 + 104).to_ne_bytes());
                put(out, 4, &0i32.to_ne_bytes());
                // Counted before the commit, which lets the stat return.
                served.root_getattrs.fetch_add(1, Ordering::SeqCst);
                req.commit(104)?;
            } else {
                put(out, 0, &16u32.to_ne_bytes());
                put(out, 4, &(-libc::ENOSYS).to_ne_bytes());
                req.commit(0)?;
            }
        }
        Ok(())
    }

    enum Event {
        EarlyRegister(io::Result<()>),
        Registered(u16, io::Result<()>),
        Ended(u16, io::Result<()>),
    }

    /// A FUSE connection mounted on a temporary directory with enable_uring set, INIT
    /// not yet answered. Fields drop in order: unmount, device, directory, parameter.
    struct Connection {
        mounted: Mounted,
        dev: Option<Arc<OwnedFd>>,
        dir: tempfile::TempDir,
        _uring: UringEnabled,
    }

    impl Connection {
        fn mount() -> Connection {
            let uring = UringEnabled::set();
            let dir = tempfile::tempdir().unwrap();
            let dev = Arc::new(crate::sys::mount::open_fuse_device().unwrap());
            let data = format!(
                "fd={},rootmode=40000,user_id=0,group_id=0",
                std::os::fd::AsRawFd::as_raw_fd(&*dev)
            );
            let flags = crate::sys::mount::FuseMountFlags {
                nosuid: true,
                nodev: true,
                ..Default::default()
            };
            crate::sys::mount::mount_fuse("stratafs-ring-test", dir.path(), "fuse", flags, &data)
                .unwrap();
            Connection {
                mounted: Mounted(Some(dir.path().to_path_buf())),
                dev: Some(dev),
                dir,
                _uring: uring,
            }
        }

        fn dev(&self) -> &Arc<OwnedFd> {
            self.dev.as_ref().expect("device open")
        }
    }

    /// Runs stat on another thread, so that a request never answered fails the test
    /// instead of hanging it: None when it has not returned within `wait`.
    fn stat_within(path: PathBuf, wait: Duration) -> Option<rustix::io::Result<(u32, u64, i64)>> {
        let (stat_tx, stat_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let st = rustix::fs::stat(&path).map(|st| (st.st_mode, st.st_nlink, st.st_mtime));
            stat_tx.send(st)
        });
        stat_rx.recv_timeout(wait).ok()
    }

    #[test]
    fn a_getattr_is_served_over_the_ring_and_unmount_ends_every_queue() {
        if !fuse_available() {
            return;
        }
        let wait = Duration::from_secs(15);
        let mut conn = Connection::mount();
        let (dir, dev) = (conn.dir.path().to_path_buf(), conn.dev().clone());

        let queues = possible_cpus().unwrap();
        let served = Arc::new(Served::default());
        let (tx, rx) = mpsc::channel();
        let mut threads = Vec::new();
        for qid in 0..queues as u16 {
            let (dev, tx, served) = (dev.clone(), tx.clone(), served.clone());
            threads.push(std::thread::spawn(move || {
                let mut queue = match FuseQueue::new(dev.as_fd(), qid, 2, MAX_WRITE) {
                    Ok(q) => q,
                    Err(e) => return tx.send(Event::Registered(qid, Err(e))).unwrap(),
                };
                if qid == 0 {
                    // INIT is held back until this one has given up.
                    let early = queue.register_within(Duration::from_millis(30));
                    tx.send(Event::EarlyRegister(early)).unwrap();
                }
                let registered = queue.register();
                let ok = registered.is_ok();
                tx.send(Event::Registered(qid, registered)).unwrap();
                if ok {
                    let _ = tx.send(Event::Ended(qid, serve(&mut queue, &served)));
                }
            }));
        }
        drop(tx);

        match rx.recv_timeout(wait).expect("queue 0 did not report") {
            Event::EarlyRegister(Err(e)) => assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}"),
            Event::EarlyRegister(Ok(())) => panic!("registered before INIT was answered"),
            Event::Registered(qid, r) => panic!("queue {qid}: {r:?} before INIT"),
            Event::Ended(qid, r) => panic!("queue {qid} ended: {r:?}"),
        }
        let granted = answer_init(&dev);
        let mut registered = vec![false; queues];
        while registered.contains(&false) {
            match rx.recv_timeout(wait).expect("a queue did not register") {
                Event::Registered(qid, Ok(())) => registered[qid as usize] = true,
                Event::Registered(qid, Err(e)) => panic!("queue {qid}: {e}"),
                Event::EarlyRegister(_) => unreachable!(),
                Event::Ended(qid, r) => panic!("queue {qid} ended early: {r:?}"),
            }
        }

        if granted & FUSE_PASSTHROUGH != 0 {
            let (a, b) = (tempfile::tempfile().unwrap(), tempfile::tempfile().unwrap());
            let first = crate::sys::fuse_dev::RingBacking::open(&dev, a.as_fd()).unwrap();
            let second = crate::sys::fuse_dev::RingBacking::open(&dev, b.as_fd()).unwrap();
            assert!(first.id() > 0 && second.id() > 0 && first.id() != second.id());
            first.close().expect("FUSE_DEV_IOC_BACKING_CLOSE");
            drop(second);
        } else {
            eprintln!("FUSE_PASSTHROUGH not offered: RingBacking not exercised");
        }

        let stat = |path: PathBuf| {
            stat_within(path, wait).expect("stat hangs: its request was not served over the ring")
        };
        let (mode, nlink, mtime) = stat(dir.clone()).expect("stat of the root");
        assert_eq!(mode, ROOT_MODE);
        assert_eq!(nlink as u32, ROOT_NLINK);
        assert_eq!(mtime as u64, ROOT_MTIME);
        assert!(served.root_getattrs.load(Ordering::SeqCst) >= 1);
        let missing = stat(dir.join("missing"));
        assert_eq!(missing, Err(rustix::io::Errno::IO));
        assert_eq!(served.lookups_of_missing.load(Ordering::SeqCst), 1);

        conn.mounted.unmount();
        let mut ended = vec![false; queues];
        while ended.contains(&false) {
            match rx
                .recv_timeout(wait)
                .expect("a queue did not end after unmount")
            {
                Event::Ended(qid, Ok(())) => ended[qid as usize] = true,
                Event::Ended(qid, Err(e)) => panic!("queue {qid} ended with {e}"),
                _ => unreachable!(),
            }
        }
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn queues_dropped_while_registered_leave_the_connection_to_its_device() {
        if !fuse_available() {
            return;
        }
        let wait = Duration::from_secs(15);
        let mut conn = Connection::mount();
        let queues = possible_cpus().unwrap();
        let (tx, rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let done_rx = Arc::new(std::sync::Mutex::new(done_rx));
        let mut threads = Vec::new();
        for qid in 0..queues as u16 {
            let (dev, tx, done_rx) = (conn.dev().clone(), tx.clone(), done_rx.clone());
            threads.push(std::thread::spawn(move || {
                let queue = FuseQueue::new(dev.as_fd(), qid, 2, MAX_WRITE);
                // The queue has its own dup; this thread must not keep the device open.
                drop(dev);
                let registered = queue.and_then(|mut q| {
                    q.register()?;
                    // Dropped with both entries in the kernel's hands, by a thread that
                    // lives on: only the ring's close can cancel them.
                    drop(q);
                    Ok(())
                });
                tx.send((qid, registered)).unwrap();
                let _ = done_rx.lock().unwrap().recv();
            }));
        }
        answer_init(conn.dev());
        for _ in 0..queues {
            let (qid, registered) = rx.recv_timeout(wait).expect("a queue did not report");
            registered.unwrap_or_else(|e| panic!("queue {qid}: {e}"));
        }
        // The ring is live but has no entry left: the kernel neither serves the stat
        // over it nor falls back to /dev/fuse. Whether it hangs is the kernel's
        // business; what it must not do is write into the freed buffers.
        let hung = stat_within(conn.dir.path().to_path_buf(), Duration::from_millis(300));
        eprintln!("stat with every queue dropped: {hung:?}");
        // Closing our last device fd aborts the connection, once io_uring's teardown
        // of the closed rings (asynchronous) has dropped the device references their
        // commands held: a request then fails instead of waiting. Its errno depends on
        // how far that teardown got (ENOTCONN, ECANCELED seen).
        conn.dev = None;
        let after = stat_within(conn.dir.path().to_path_buf(), wait);
        assert!(
            matches!(after, Some(Err(_))),
            "stat after closing the device: {after:?}"
        );
        drop(done_tx);
        for t in threads {
            t.join().unwrap();
        }
    }
}
