//! Advisory whole-file locks (flock(2)) on state-directory files. A lock belongs to
//! the open file description, so it ends when the holder closes the file or dies
//! (kill -9 included): that is what makes it usable as a liveness claim.

use std::os::fd::AsFd;

use rustix::fs::FlockOperation;

use super::{Errno, SysResult};

/// Takes an exclusive lock, waiting for it.
pub fn lock_exclusive(fd: impl AsFd) -> SysResult<()> {
    loop {
        match rustix::fs::flock(fd.as_fd(), FlockOperation::LockExclusive) {
            Err(Errno::INTR) => continue,
            other => return other,
        }
    }
}

/// Takes an exclusive lock if nobody holds one; `Ok(false)` when another holds it.
pub fn try_lock_exclusive(fd: impl AsFd) -> SysResult<bool> {
    match rustix::fs::flock(fd.as_fd(), FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(Errno::WOULDBLOCK) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Takes a shared lock if no exclusive one is held; `Ok(false)` otherwise.
pub fn try_lock_shared(fd: impl AsFd) -> SysResult<bool> {
    match rustix::fs::flock(fd.as_fd(), FlockOperation::NonBlockingLockShared) {
        Ok(()) => Ok(true),
        Err(Errno::WOULDBLOCK) => Ok(false),
        Err(e) => Err(e),
    }
}

pub fn unlock(fd: impl AsFd) -> SysResult<()> {
    rustix::fs::flock(fd.as_fd(), FlockOperation::Unlock)
}
