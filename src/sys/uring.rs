//! A minimal io_uring, only what FUSE-over-io_uring needs (see `super::fuse_ring`):
//! 128-byte submission entries (IORING_SETUP_SQE128, which the FUSE commands require
//! for their command area), submitting, waiting with an optional timeout, reaping.
//!
//! Why our own and not the io-uring crate: FUSE's REGISTER command passes its two
//! buffers as `sqe->addr` = iovec array and `sqe->len` = 2, and the crate's
//! `UringCmd80` has no way to set `len` short of writing into its private entry
//! layout. What is left is two syscalls (through rustix) and three mappings.
//!
//! Invariants:
//! - One `Ring` is used by one thread (it holds raw pointers, so it is neither Send
//!   nor Sync): the SQ tail and the CQ head are written only by us, the SQ head and the
//!   CQ tail only by the kernel, and the kernel's side is read with Acquire and ours
//!   published with Release, as the io_uring ABI specifies.
//! - Every pointer below points into a mapping owned by the same `Ring`, so none
//!   outlives what it points into.
//! - An SQE slot is reusable as soon as `io_uring_enter` has consumed it: the kernel
//!   copies what it needs of an SQE before the SQ head moves past it.

// Used only by fuse_ring, whose daemon glue lands separately.
#![cfg_attr(not(test), allow(dead_code))]

use std::ffi::c_void;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rustix::io::Errno;
use rustix::io_uring::{
    IORING_OFF_SQ_RING, IORING_OFF_SQES, IoringEnterFlags, IoringFeatureFlags, IoringOp,
    IoringSetupFlags, io_uring_getevents_arg, io_uring_params, io_uring_ptr,
};
use rustix::mm::{MapFlags, ProtFlags};

/// A submission entry of a ring set up with IORING_SETUP_SQE128: the 64 bytes of
/// `struct io_uring_sqe` as IORING_OP_URING_CMD reads them, with `cmd` starting at
/// offset 48 (where `addr3` would be) and running 80 bytes to the end.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Sqe128 {
    pub opcode: u8,
    pub flags: u8,
    pub ioprio: u16,
    pub fd: i32,
    pub cmd_op: u32,
    pub pad1: u32,
    pub addr: u64,
    pub len: u32,
    pub uring_cmd_flags: u32,
    pub user_data: u64,
    pub buf_index: u16,
    pub personality: u16,
    pub file_index: u32,
    pub cmd: [u8; 80],
}

impl Sqe128 {
    /// An IORING_OP_URING_CMD entry on `fd` with every other field zero (the kernel
    /// refuses non-zero reserved fields).
    pub fn uring_cmd(fd: BorrowedFd<'_>, cmd_op: u32, user_data: u64) -> Sqe128 {
        use std::os::fd::AsRawFd;
        Sqe128 {
            opcode: IoringOp::UringCmd as u8,
            flags: 0,
            ioprio: 0,
            fd: fd.as_raw_fd(),
            cmd_op,
            pad1: 0,
            addr: 0,
            len: 0,
            uring_cmd_flags: 0,
            user_data,
            buf_index: 0,
            personality: 0,
            file_index: 0,
            cmd: [0; 80],
        }
    }
}

/// `struct io_uring_cqe` (16 bytes: the ring is not set up with CQE32).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cqe {
    pub user_data: u64,
    pub res: i32,
    pub flags: u32,
}

/// One mmap, unmapped on drop. `std::mem::forget` of it leaks the memory on purpose
/// (see `FuseQueue`'s Drop): nothing else ever frees it.
pub struct Mapping {
    ptr: NonNull<c_void>,
    len: usize,
}

impl Mapping {
    /// Zeroed private anonymous memory, page aligned.
    pub fn anonymous(len: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh mapping chosen by the kernel (null hint) overlaps nothing
        // this process uses.
        let ptr = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
            )?
        };
        Ok(Mapping {
            ptr: NonNull::new(ptr).ok_or_else(|| io::Error::other("mmap returned null"))?,
            len,
        })
    }

    /// A shared mapping of `fd` at `offset` (an io_uring's rings or its SQE array).
    fn shared(fd: BorrowedFd<'_>, len: usize, offset: u64) -> io::Result<Mapping> {
        // SAFETY: as above, a new mapping placed by the kernel; the io_uring fd's
        // offsets name memory the kernel sized from the setup parameters.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::POPULATE,
                fd,
                offset,
            )?
        };
        Ok(Mapping {
            ptr: NonNull::new(ptr).ok_or_else(|| io::Error::other("mmap returned null"))?,
            len,
        })
    }

    pub fn base(&self) -> *mut u8 {
        self.ptr.as_ptr().cast()
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly one mapping made by `Mapping`, unmapped only here.
        if let Err(e) = unsafe { rustix::mm::munmap(self.ptr.as_ptr(), self.len) } {
            log::debug!("munmap of {} bytes: {e}", self.len);
        }
    }
}

/// The io_uring. Field order is drop order: the mappings hold their own reference to
/// the ring file, so the kernel tears the ring down once the fd and both mappings are
/// gone, whatever the order.
pub struct Ring {
    /// Held for its Drop: the pointers below point into it.
    _rings: Mapping,
    sqes: Mapping,
    fd: OwnedFd,
    sq_head: *const AtomicU32,
    sq_tail: *const AtomicU32,
    sq_mask: u32,
    sq_entries: u32,
    cq_head: *const AtomicU32,
    cq_tail: *const AtomicU32,
    cq_mask: u32,
    cqes: *const Cqe,
    /// Entries pushed but not yet consumed by an io_uring_enter.
    unsubmitted: u32,
}

impl Ring {
    /// A ring of at least `entries` SQEs (the kernel rounds up to a power of two) and
    /// twice as many CQEs.
    pub fn new(entries: u32) -> io::Result<Ring> {
        let mut params = io_uring_params::default();
        // SUBMIT_ALL: an entry the kernel refuses at submission still lets the ones
        // after it through (each gets its own CQE), so `unsubmitted` stays exact.
        params.flags = IoringSetupFlags::SQE128 | IoringSetupFlags::SUBMIT_ALL;
        // SAFETY: `params` is a valid io_uring_params the kernel fills in.
        let fd = unsafe { rustix::io_uring::io_uring_setup(entries, &mut params)? };
        let needed = IoringFeatureFlags::SINGLE_MMAP | IoringFeatureFlags::EXT_ARG;
        if !params.features.contains(needed) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring lacks IORING_FEAT_SINGLE_MMAP or IORING_FEAT_EXT_ARG (Linux < 5.11)",
            ));
        }
        let sq = params.sq_off;
        let cq = params.cq_off;
        let sq_len = sq.array as usize + params.sq_entries as usize * size_of::<u32>();
        let cq_len = cq.cqes as usize + params.cq_entries as usize * size_of::<Cqe>();
        // SINGLE_MMAP: the SQ and CQ rings are one region, mapped once at its larger size.
        let rings = Mapping::shared(fd.as_fd(), sq_len.max(cq_len), IORING_OFF_SQ_RING)?;
        let sqes = Mapping::shared(
            fd.as_fd(),
            params.sq_entries as usize * size_of::<Sqe128>(),
            IORING_OFF_SQES,
        )?;
        let at = |off: u32| -> *mut u8 {
            // SAFETY: every offset the kernel returned lies inside the region it
            // told us to map (checked against the length just below).
            unsafe { rings.base().add(off as usize) }
        };
        for off in [
            sq.head,
            sq.tail,
            sq.ring_mask,
            sq.array,
            cq.head,
            cq.tail,
            cq.ring_mask,
            cq.cqes,
        ] {
            if off as usize >= rings.len() {
                return Err(io::Error::other("io_uring ring offset outside its mapping"));
            }
        }
        // SAFETY: ring_mask fields are u32s inside the mapping, aligned by the kernel.
        let (sq_mask, cq_mask) = unsafe {
            (
                at(sq.ring_mask).cast::<u32>().read(),
                at(cq.ring_mask).cast::<u32>().read(),
            )
        };
        let array = at(sq.array).cast::<u32>();
        for i in 0..params.sq_entries {
            // SAFETY: the SQ index array has sq_entries u32 slots (sq_len above). An
            // identity map makes SQE slot = tail & mask; the kernel reads the array
            // only for entries published by a later tail store.
            unsafe { array.add(i as usize).write(i) };
        }
        Ok(Ring {
            sq_head: at(sq.head).cast(),
            sq_tail: at(sq.tail).cast(),
            sq_mask,
            sq_entries: params.sq_entries,
            cq_head: at(cq.head).cast(),
            cq_tail: at(cq.tail).cast(),
            cq_mask,
            cqes: at(cq.cqes).cast(),
            _rings: rings,
            sqes,
            fd,
            unsubmitted: 0,
        })
    }

    fn sq_head(&self) -> &AtomicU32 {
        // SAFETY: points at the kernel's SQ head u32 in `rings`, alive with self.
        unsafe { &*self.sq_head }
    }
    fn sq_tail(&self) -> &AtomicU32 {
        // SAFETY: as above, the SQ tail.
        unsafe { &*self.sq_tail }
    }
    fn cq_head(&self) -> &AtomicU32 {
        // SAFETY: as above, the CQ head.
        unsafe { &*self.cq_head }
    }
    fn cq_tail(&self) -> &AtomicU32 {
        // SAFETY: as above, the CQ tail.
        unsafe { &*self.cq_tail }
    }

    /// Queues one entry for the next [`Ring::enter`].
    pub fn push(&mut self, sqe: &Sqe128) -> io::Result<()> {
        let head = self.sq_head().load(Ordering::Acquire);
        let tail = self.sq_tail().load(Ordering::Relaxed);
        if tail.wrapping_sub(head) >= self.sq_entries {
            return Err(io::Error::other("io_uring submission queue full"));
        }
        let slot = (tail & self.sq_mask) as usize;
        // SAFETY: slot < sq_entries, and the slot is free: the kernel consumed every
        // entry before `head`, and the ones between head and tail are not this one.
        unsafe {
            self.sqes.base().cast::<Sqe128>().add(slot).write(*sqe);
        }
        self.sq_tail()
            .store(tail.wrapping_add(1), Ordering::Release);
        self.unsubmitted += 1;
        Ok(())
    }

    /// Submits what was pushed and, if `wait`, waits until at least one CQE is there
    /// (or `timeout` passed, or a signal came: the caller looks at the CQ either way).
    pub fn enter(&mut self, wait: bool, timeout: Option<Duration>) -> io::Result<()> {
        let mut flags = IoringEnterFlags::empty();
        if wait {
            flags |= IoringEnterFlags::GETEVENTS;
        }
        let min_complete = u32::from(wait);
        loop {
            let result = match timeout.filter(|_| wait) {
                None => {
                    // SAFETY: every SQE we push refers to memory that outlives its
                    // command (the FUSE entries' buffers and iovecs; see fuse_ring).
                    unsafe {
                        rustix::io_uring::io_uring_enter(
                            &self.fd,
                            self.unsubmitted,
                            min_complete,
                            flags,
                        )
                    }
                }
                Some(t) => {
                    let ts = rustix::fs::Timespec {
                        tv_sec: t.as_secs() as i64,
                        tv_nsec: i64::from(t.subsec_nanos()),
                    };
                    let arg = io_uring_getevents_arg {
                        ts: io_uring_ptr::new((&raw const ts).cast_mut().cast()),
                        ..Default::default()
                    };
                    // SAFETY: as above; `arg` and `ts` live across the call.
                    unsafe {
                        rustix::io_uring::io_uring_enter_arg(
                            &self.fd,
                            self.unsubmitted,
                            min_complete,
                            flags | IoringEnterFlags::EXT_ARG,
                            Some(&arg),
                        )
                    }
                }
            };
            match result {
                Ok(n) => {
                    self.unsubmitted -= n.min(self.unsubmitted);
                    if self.unsubmitted == 0 {
                        return Ok(());
                    }
                }
                // A timeout or a signal ends a wait, not an error: the caller re-checks.
                Err(Errno::TIME | Errno::INTR) if self.unsubmitted == 0 => return Ok(()),
                Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The next completion, if any.
    pub fn pop(&mut self) -> Option<Cqe> {
        let head = self.cq_head().load(Ordering::Relaxed);
        let tail = self.cq_tail().load(Ordering::Acquire);
        if head == tail {
            return None;
        }
        // SAFETY: head != tail, so the slot holds a CQE the kernel published (Acquire
        // above); the index is masked into the CQ array.
        let cqe = unsafe { self.cqes.add((head & self.cq_mask) as usize).read() };
        self.cq_head()
            .store(head.wrapping_add(1), Ordering::Release);
        Some(cqe)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn sqe128_matches_the_kernel_layout() {
        assert_eq!(size_of::<Sqe128>(), 128);
        assert_eq!(offset_of!(Sqe128, fd), 4);
        assert_eq!(offset_of!(Sqe128, cmd_op), 8);
        assert_eq!(offset_of!(Sqe128, addr), 16);
        assert_eq!(offset_of!(Sqe128, len), 24);
        assert_eq!(offset_of!(Sqe128, uring_cmd_flags), 28);
        assert_eq!(offset_of!(Sqe128, user_data), 32);
        assert_eq!(offset_of!(Sqe128, buf_index), 40);
        assert_eq!(offset_of!(Sqe128, file_index), 44);
        assert_eq!(offset_of!(Sqe128, cmd), 48);
        assert_eq!(size_of::<Cqe>(), 16);
    }

    #[test]
    fn anonymous_mappings_are_zeroed_and_page_aligned() {
        let m = Mapping::anonymous(3 * 4096).unwrap();
        assert_eq!(m.len(), 3 * 4096);
        assert_eq!(m.base() as usize % rustix::param::page_size(), 0);
        // SAFETY: the mapping is ours, readable and writable over its whole length.
        let bytes = unsafe { std::slice::from_raw_parts_mut(m.base(), m.len()) };
        assert!(bytes.iter().all(|b| *b == 0));
        bytes[m.len() - 1] = 1;
    }

    #[test]
    fn a_ring_is_created_and_times_out_when_idle() {
        let mut ring = Ring::new(4).expect("io_uring_setup with SQE128");
        assert!(ring.pop().is_none());
        let start = std::time::Instant::now();
        ring.enter(true, Some(Duration::from_millis(20))).unwrap();
        assert!(start.elapsed() >= Duration::from_millis(15));
        assert!(ring.pop().is_none());
    }

    #[test]
    fn a_uring_cmd_on_a_file_without_uring_cmd_completes_with_eopnotsupp() {
        // A regular file: /dev/null would not do, it answers uring_cmd with 0.
        let file = tempfile::tempfile().unwrap();
        let mut ring = Ring::new(4).unwrap();
        ring.push(&Sqe128::uring_cmd(file.as_fd(), 0, 7)).unwrap();
        ring.enter(true, Some(Duration::from_secs(5))).unwrap();
        let cqe = ring.pop().expect("a completion");
        assert_eq!(cqe.user_data, 7);
        assert_eq!(cqe.res, -libc::EOPNOTSUPP);
    }
}
